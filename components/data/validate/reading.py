"""Reading a table file: the contract's columns, bad bytes kept as escapes, bad CSV lines named."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.errors import DataError


def read_table(path: Path, table: str, columns: set[str]) -> pd.DataFrame:
    """The contract's columns of one table file; non-UTF-8 bytes become surrogate escapes."""
    if not path.exists():
        raise DataError(f"{path}: file not found (expected {table}.parquet or {table}.csv)")
    if path.suffix == ".csv":
        check_csv_records(path)
        try:
            return pd.read_csv(
                path,
                dtype=str,  # judge types ourselves, per row, instead of failing the whole read
                keep_default_na=False,
                na_values=[""],
                usecols=lambda name: name in columns,
                encoding="utf-8-sig",
                encoding_errors="surrogateescape",
            )
        except (ValueError, OSError) as err:  # pandas' parser errors are ValueErrors
            raise DataError(f"{path}: not a readable CSV file ({first_line(err)})") from err
    try:
        names = [name for name in pq.read_schema(path).names if name in columns]
        arrow = pq.read_table(path, columns=names)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(err)})") from err
    return pd.DataFrame({name: _arrow_column(arrow.column(name)) for name in names}).reindex(
        pd.RangeIndex(arrow.num_rows)
    )


def check_csv_records(path: Path, delimiter: str = ",") -> None:
    """Refuse a CSV with a record whose field count differs from the header's, naming its line:
    pandas would shift such a line's values into the wrong columns, or drop some, silently."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        records = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(records, None)
            for record in records if header is not None else ():
                if record and len(record) != len(header):
                    raise DataError(
                        f"{path}: not a readable CSV file (line {records.line_num} has "
                        f"{_fields(len(record))}, the header {len(header)}: an unquoted comma "
                        "or quote?)"
                    )
        except csv.Error as err:
            raise DataError(
                f"{path}: not a readable CSV file (line {records.line_num}: {err})"
            ) from err


def _fields(n: int) -> str:
    return f"{n} field" if n == 1 else f"{n} fields"


def _arrow_column(column: pa.ChunkedArray) -> pd.Series:
    """A Parquet column as pandas; text that is not valid UTF-8 is decoded per value, not fatal."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            column.validate(full=True)  # Arrow does not check UTF-8 when it reads a file
            return column.to_pandas()
        except pa.ArrowInvalid:
            wide = pa.types.is_large_string(kind)
            return _decode_each(column.cast(pa.large_binary() if wide else pa.binary()))
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            return column.cast(pa.large_string()).to_pandas()  # the cast checks UTF-8
        except pa.ArrowInvalid:
            return _decode_each(column)
    return column.to_pandas()


def _decode_each(column: pa.ChunkedArray) -> pd.Series:
    return pd.Series(
        [None if b is None else b.decode("utf-8", "surrogateescape") for b in column.to_pylist()],
        dtype=object,
    )


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
