"""One way to draw a figure (headless, saved as PNG, always closed), and the training curves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def figure(path: Path, *grid: int, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(*grid, **subplots)` on the Agg backend (no display needed); the figure is
    written to `path` when the block ends and closed even when it fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **subplots)
    try:
        yield fig, axes
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_history(history: list[dict[str, float]], keys: list[str], path: Path) -> None:
    with figure(path, 1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False) as (fig, axes):
        for ax, key in zip(axes[0], keys, strict=True):
            points = [(h["step"], h[key]) for h in history if key in h]
            if not points:
                continue
            steps, values = map(np.array, zip(*points, strict=True))
            ax.plot(steps, values, lw=0.6, alpha=0.4)
            width = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(width) / width, mode="valid")
            ax.plot(steps[width - 1 :], smooth, lw=1.5)
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.tight_layout()
