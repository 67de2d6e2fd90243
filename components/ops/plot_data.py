"""Plot data for DVC: small CSV files under `paths.plots_dir` that git keeps beside dvc.lock.

`dvc plots show` draws the current run from them and `dvc plots diff` overlays experiments (one
line or bar per experiment), so they are written the same way by `dvc repro` and the Prefect
flow. Each folder is rewritten whole: a series the current run lacks (an adversarial loss after
a twinbert run) must not linger from an earlier one.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_POINTS = 200  # per training curve: enough to see its shape, small enough for git
RECALL = "recall"  # the folder of recall curves under plots_dir, one CSV per model


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _write_csv(path: Path, header: Sequence[str], rows: list[Sequence[object]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_training_curves(
    history: list[dict[str, float]], folder: Path, points: int = MAX_POINTS
) -> list[Path]:
    """One CSV per logged series (`step,<series>`): the mean over each of at most `points`
    equal windows of its steps, at the window's last step."""
    _fresh(folder)
    series = sorted({key for record in history for key in record} - {"step"})
    written = []
    for key in series:
        steps = np.array([r["step"] for r in history if key in r])
        values = np.array([r[key] for r in history if key in r], dtype=float)
        windows = np.array_split(np.arange(len(steps)), min(points, len(steps)))
        rows = [(int(steps[w[-1]]), f"{values[w].mean():.6g}") for w in windows]
        path = folder / f"{key}.csv"
        _write_csv(path, ("step", key), rows)
        written.append(path)
    return written


def write_recall_curves(curves: dict[str, np.ndarray], folder: Path) -> list[Path]:
    """`<name>.csv` (`k,recall`) per model ('model' for ace's, a baseline's name for the others):
    in `dvc plots diff` each model's chart overlays the experiments."""
    _fresh(folder)
    written = []
    for name, curve in curves.items():
        path = folder / f"{name}.csv"
        rows = [(k, f"{value:.6g}") for k, value in enumerate(curve, start=1)]
        _write_csv(path, ("k", "recall"), rows)
        written.append(path)
    return written


def _cell(value: object) -> object:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def write_table(rows: list[dict[str, object]], columns: Sequence[str], path: Path) -> Path:
    """A CSV with exactly `columns` (empty where a row lacks one): DVC's charts name fields, and
    a field missing from one experiment's file would fail the whole chart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = [[_cell(row.get(column)) for column in columns] for row in rows]
    _write_csv(path, columns, table)
    return path
