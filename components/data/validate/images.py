"""Image probes: every product image decoded once, and refused if it lies outside the data."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

# cv2 releases the GIL while decoding and reading files blocks on I/O: threads overlap both.
_IMAGE_WORKERS = min(16, 4 * (os.cpu_count() or 1))


def _probe_image(path: Path) -> tuple[str, int, int]:
    """(status, width, height) of one image file: decoding it is the only proof it is usable."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return "missing_image", 0, 0
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error:
        image = None
    if image is None:
        return "corrupt_image", 0, 0
    return "ok", int(image.shape[1]), int(image.shape[0])


def _inside_roots(data_dir: Path) -> tuple[Path, ...]:
    """Where an image file may really lie: the data folder, and the DVC cache of the project
    around it (with DVC's `cache.type: symlink` every data file is a link into that cache)."""
    data_root = data_dir.resolve()
    for folder in (data_root, *data_root.parents):
        if (folder / ".dvc").is_dir():
            return data_root, (folder / ".dvc" / "cache").resolve()
    return (data_root,)


def probe_images(image_paths: pd.Series, data_dir: Path) -> pd.DataFrame:
    """image_status, image_width, image_height, image_min_side per row (NA where not decoded)."""
    roots = _inside_roots(data_dir)

    def probe(relative: str) -> tuple[str, int, int]:
        # The data must be self-contained: DVC versions data_dir, nothing outside it. The text
        # is checked first, then where the path really leads (symlinks followed, nothing opened).
        if os.path.isabs(relative) or os.path.normpath(relative).split(os.sep)[0] == os.pardir:
            return "image_outside_data_dir", 0, 0
        try:
            target = (data_dir / relative).resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
            return "missing_image", 0, 0
        if not any(target.is_relative_to(root) for root in roots):
            return "image_outside_data_dir", 0, 0
        return _probe_image(target)

    unique = image_paths.dropna().unique()
    with ThreadPoolExecutor(_IMAGE_WORKERS) as pool:
        found = dict(zip(unique, pool.map(probe, unique), strict=True))
    probed = [
        found.get(p, (None, np.nan, np.nan)) if isinstance(p, str) else (None,) * 3
        for p in image_paths
    ]
    status = pd.Series([r[0] for r in probed], index=image_paths.index, dtype="string")
    decoded = (status == "ok").fillna(False)
    width = pd.Series([r[1] for r in probed], index=image_paths.index, dtype="float64")
    height = pd.Series([r[2] for r in probed], index=image_paths.index, dtype="float64")
    return pd.DataFrame(
        {
            "image_status": status,
            "image_width": width.where(decoded),
            "image_height": height.where(decoded),
            "image_min_side": np.minimum(width, height).where(decoded),
        }
    )
