"""Property-style: random corruptions of a tiny world's files never make `validate` crash.

Each case draws, from its own seed, a format and one to three corruptions (byte-level damage to a
table file, hostile cell values, a dropped or renamed column, broken or escaping images, an
emptied table) and runs the stage. The only outcomes allowed are those a user can act on: the
stage passes with counts that reconcile in every output, or it raises DataError with one line
that names a data file. Anything else (a traceback) fails the test with the case's seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from components.config import ValidateConfig
from components.data.validate import validate_data
from components.errors import DataError
from tests.data.validate_fixtures import clean_tables, write_tables

HOSTILE_VALUES = [
    None,
    "",
    "   ",
    "NaN",
    "1e309",
    "-1",
    "1.5",
    "3.0",
    "true",
    "x" * 600,
    "👗🔥",
    "红色连衣裙",
    "../../etc/passwd",
    "/etc/passwd",
    "images/../../outside.jpg",
    'quote " and, comma',
    "line\nbreak",
    "\x00nul",
    "\ufeffbom",
    10**20,
    -3,
    2.5,
]
TABLES = ("products", "impressions")


def _cells(rng: np.random.Generator, tables: dict[str, pd.DataFrame], data_dir: Path) -> None:
    name = str(rng.choice(TABLES))
    frame = tables[name].astype(object)
    for _ in range(int(rng.integers(1, 6)) if len(frame) else 0):
        row = int(rng.integers(len(frame)))
        column = str(rng.choice(frame.columns))
        frame.iat[row, frame.columns.get_loc(column)] = HOSTILE_VALUES[
            int(rng.integers(len(HOSTILE_VALUES)))
        ]
    tables[name] = frame


def _columns(rng: np.random.Generator, tables: dict[str, pd.DataFrame], data_dir: Path) -> None:
    name = str(rng.choice(TABLES))
    column = str(rng.choice(tables[name].columns))
    if rng.random() < 0.5:
        tables[name] = tables[name].drop(columns=column)
    else:
        tables[name] = tables[name].rename(columns={column: column.upper()})


def _rows(rng: np.random.Generator, tables: dict[str, pd.DataFrame], data_dir: Path) -> None:
    name = str(rng.choice(TABLES))
    frame = tables[name]
    if frame.empty:
        return
    picked = rng.integers(len(frame), size=int(rng.integers(1, 8)))
    choice = rng.random()
    if choice < 0.2:
        tables[name] = frame.head(0)
    elif choice < 0.6:
        tables[name] = pd.concat([frame, frame.iloc[picked]], ignore_index=True)  # duplicates
    else:
        tables[name] = frame.drop(index=frame.index[picked]).reset_index(drop=True)


def _images(rng: np.random.Generator, tables: dict[str, pd.DataFrame], data_dir: Path) -> None:
    images = sorted((data_dir / "images").iterdir())
    image = images[int(rng.integers(len(images)))]
    kind = int(rng.integers(5))
    if kind == 0:
        image.write_bytes(rng.bytes(int(rng.integers(0, 3000))))
    elif kind == 1:
        image.write_bytes(image.read_bytes()[: int(rng.integers(1, 200))])
    elif kind == 2:
        image.unlink()
    elif kind == 3:
        image.unlink()
        image.symlink_to(data_dir.parent / "outside.jpg")
    else:
        image.unlink()
        image.mkdir()  # a folder where the file should be


Corruption = Callable[[np.random.Generator, dict[str, pd.DataFrame], Path], None]
FRAME_CORRUPTIONS: list[Corruption] = [_cells, _columns, _rows, _images]


def _write(data_dir: Path, tables: dict[str, pd.DataFrame], fmt: str) -> dict[str, Path]:
    if fmt == "parquet":
        for name, frame in tables.items():
            try:
                frame.to_parquet(data_dir / f"{name}.parquet", index=False)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                # Mixed types cannot go in one Parquet column: write them as text.
                frame.astype(object).map(lambda v: v if v is None else str(v)).to_parquet(
                    data_dir / f"{name}.parquet", index=False
                )
        return {name: data_dir / f"{name}.parquet" for name in tables}
    paths = write_tables(data_dir, tables["products"], tables["impressions"], fmt)
    return dict(zip(TABLES, paths, strict=True))


def _damage_bytes(rng: np.random.Generator, path: Path) -> None:
    """Truncate, overwrite or splice hostile bytes into a written table file."""
    data = bytearray(path.read_bytes())
    kind = int(rng.integers(3))
    at = int(rng.integers(len(data) + 1))
    if kind == 0:
        del data[at:]
    elif kind == 1 and data:
        for position in rng.integers(len(data), size=int(rng.integers(1, 8))):
            data[int(position)] = int(rng.integers(256))
    elif kind == 2:
        splice = [b",", b'"', b"\n", b"\r\n", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf", b",,,"]
        data[at:at] = splice[int(rng.integers(len(splice)))]
    path.write_bytes(bytes(data))


def _reconciles(out: Path) -> None:
    summary = json.loads((out / "validation.json").read_text())
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    for table in TABLES:
        counts = summary["tables"][table]
        assert counts["rows_in"] == counts["rows_kept"] + counts["rows_quarantined"]
        assert len(pd.read_parquet(out / f"{table}.parquet")) == counts["rows_kept"]
        rows = quarantine[quarantine["table"] == table]
        assert len(rows) == counts["rows_quarantined"] == sum(counts["reasons"].values())
        assert rows["row"].is_unique and rows["row"].between(0, counts["rows_in"] - 1).all()
        assert (rows["reason"].str.len() > 0).all() and (rows["detail"].str.len() > 0).all()


@pytest.mark.parametrize("seed", range(24))
def test_random_corruptions_end_in_counts_that_reconcile_or_one_line(tmp_path, seed):
    rng = np.random.default_rng([17, seed])
    data_dir = tmp_path / "data"
    products, impressions = clean_tables(data_dir, seed=seed)
    (tmp_path / "outside.jpg").write_bytes((data_dir / "images" / "p000.jpg").read_bytes())
    tables = {"products": products, "impressions": impressions}
    fmt = "csv" if rng.random() < 0.5 else "parquet"
    for _ in range(int(rng.integers(1, 4))):
        FRAME_CORRUPTIONS[int(rng.integers(len(FRAME_CORRUPTIONS)))](rng, tables, data_dir)
    paths = _write(data_dir, tables, fmt)
    if rng.random() < 0.4:
        _damage_bytes(rng, paths[str(rng.choice(TABLES))])
    out = tmp_path / "out"

    try:
        report = validate_data(data_dir, out, ValidateConfig(max_quarantine_share=0.5))
    except DataError as err:
        message = str(err)
        assert "\n" not in message, message
        assert any(message.startswith(f"{path}: ") for path in paths.values()), message
        if (out / "validation.json").exists():  # a share failure writes its outputs first
            _reconciles(out)
        return
    _reconciles(out)
    assert report.products_kept > 0 and report.impressions_kept > 0
