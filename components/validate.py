"""The validate stage: Great Expectations judges catalog and click log; bad rows are quarantined.

Input is the data contract (components/contract.py): `products.{parquet|csv}` and
`impressions.{parquet|csv}` in `data_dir`, with images under it. Allowances for a user's data:

- `search_id` is optional. When the column is absent, one search is taken to be one query issued
  on one day: search_id = the first 16 hex digits of blake2b(f"{day}\\x1f{query}"), so the id is
  stable across runs and data versions. (Two identical queries on one day merge into one search.)
- `timestamp` is accepted instead of `day` (a Parquet timestamp, an ISO-8601 string, or numeric
  Unix seconds): day = whole days from the earliest valid timestamp's date (UTC dates for
  timezone-aware stamps). When both are present, `day` is used.
- `category` is optional: a product without one (no column, or a null or blank value) gets
  contract.NO_CATEGORY, so the validated table always has the column; finetune's mixed negatives
  then fall back to random ones for those products.

Text is decoded as UTF-8; undecodable bytes (in a CSV, or a Parquet string/binary column) do not
stop the read: the row is quarantined as invalid_utf8:<col>, the bytes shown as \\xNN in its detail.
In a CSV only an empty cell is null ("NA", "null" are ordinary text). A CSV line with more or fewer
fields than the header (an unquoted comma in a title) refuses the file, naming the line. Columns
outside the contract are ignored and not carried into the outputs.

Every row-level check is an expectation in one GX suite per table. Checks pandas cannot express as
an expectation (UTF-8, duplicates, image decoding, foreign key, integer casts) are first computed as
derived status columns, which the suite then judges. A rejected row gets exactly one reason: the
first failing check in this priority order (the order of the suite's checks below).

products:
  1. invalid_utf8:<col>      product_id, title, category, image_path
  2. null:<col>              product_id, title, image_path; a blank product_id or image_path is null
  3. duplicate_product_id    an earlier row has the same product_id (the first occurrence is kept)
  4. empty_title             title blank after stripping whitespace
  5. title_too_long          stripped title longer than max_title_chars
  6. image_outside_data_dir  image_path is absolute, climbs out of data_dir, or leads out of it
                             through a symlink (resolved first; the file is never opened); a
                             link into the project's DVC cache counts as inside
     missing_image           no readable file at image_path
     corrupt_image           the file's bytes do not decode as an image (cv2.imdecode)
  7. image_too_small         width or height below min_image_side
impressions:
  1. invalid_utf8:<col>      search_id (when given), query, product_id
  2. null:<col>              search_id (when given), query, product_id, position, clicked,
                             day (or timestamp)
  3. bad_type:<col>          position, clicked, day: not integer-castable; timestamp: not a time
  4. duplicate_impression    an earlier row has every given field equal (the first one is kept)
  5. empty_query             query blank after stripping whitespace
  6. query_too_long          stripped query longer than max_query_chars
  7. position_out_of_range   position outside 1..max_position
  8. clicked_not_binary      clicked not 0 or 1
  9. negative_day            day < 0
 10. unknown_product         product_id is not in the products table at all
     product_quarantined     product_id is in the products table, but all its rows were quarantined

Outputs (replacing `out_dir` atomically): products.parquet and impressions.parquet (the kept rows,
contract columns, strings as pandas "string", integers int64, values untouched), quarantine.parquet
(table, row = 0-based data row in the input file, key, reason, detail), validation.json (counts,
reasons, every expectation's outcome, thresholds) and data_docs/<table>.html (GX's rendering of
each suite's result).

Fatal problems raise DataError with one line naming the file: a table missing, unreadable or
empty, a required column missing, a malformed CSV line, or more than max_quarantine_share of a
table (or every row of it) quarantined (then all outputs are written first, so the quarantine can
be inspected).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Formatter
from types import ModuleType
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components import contract
from components.atomic import publish_dir
from components.config import ValidateConfig
from components.errors import DataError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from great_expectations.core import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation

PRODUCTS_FILE = "products.parquet"
IMPRESSIONS_FILE = "impressions.parquet"
QUARANTINE_FILE = "quarantine.parquet"
REPORT_FILE = "validation.json"
DATA_DOCS_DIR = "data_docs"

TIMESTAMP = "timestamp"  # accepted in place of `day`
QUARANTINE_COLUMNS = ("table", "row", "key", "reason", "detail")
_STRING_IMPRESSION_COLUMNS = tuple(
    c for c, k in contract.IMPRESSION_COLUMNS.items() if k == "string"
)
_INT_IMPRESSION_COLUMNS = tuple(c for c, k in contract.IMPRESSION_COLUMNS.items() if k == "int64")
_BLANK_IS_NULL = ("product_id", "category", "image_path", "search_id")  # titles/queries: own reason
_UNDECODED_BYTE = r"[\udc80-\udcff]"  # what surrogateescape turns a non-UTF-8 byte into
# cv2 releases the GIL while decoding and reading files blocks on I/O: threads overlap both.
_IMAGE_WORKERS = min(16, 4 * (os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    """Row counts of one validation; rows in = kept + quarantined for each table, always."""

    products_in: int
    products_kept: int
    products_quarantined: int
    impressions_in: int
    impressions_kept: int
    impressions_quarantined: int
    reasons: dict[str, int]  # "<table>/<reason>" -> quarantined rows
    seconds: float

    def __post_init__(self) -> None:
        for table in (contract.PRODUCTS, contract.IMPRESSIONS):
            rows_in, kept, quarantined = (
                getattr(self, f"{table}_{part}") for part in ("in", "kept", "quarantined")
            )
            by_reason = sum(n for key, n in self.reasons.items() if key.startswith(f"{table}/"))
            if rows_in != kept + quarantined or by_reason != quarantined:
                raise ValueError(
                    f"{table}: {rows_in} in != {kept} kept + {quarantined} quarantined "
                    f"({by_reason} by reason)"
                )

    @property
    def products_quarantine_share(self) -> float:
        return _share(self.products_quarantined, self.products_in)

    @property
    def impressions_quarantine_share(self) -> float:
        return _share(self.impressions_quarantined, self.impressions_in)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow (whose names may not hold ':' on every OS, hence '.')."""
        flat: dict[str, float] = {}
        for table in (contract.PRODUCTS, contract.IMPRESSIONS):
            for part in ("in", "kept", "quarantined", "quarantine_share"):
                flat[f"{table}_{part}"] = float(getattr(self, f"{table}_{part}"))
        for key, count in sorted(self.reasons.items()):
            flat[f"quarantined.{key.replace('/', '.').replace(':', '.')}"] = float(count)
        flat["seconds"] = self.seconds
        return flat


def validate_data(data_dir: Path, out_dir: Path, cfg: ValidateConfig) -> ValidationReport:
    """Judge `data_dir` against the contract; write kept rows, quarantine, report to `out_dir`."""
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    context = _gx_context()

    products_path = contract.table_file(data_dir, contract.PRODUCTS)
    impressions_path = contract.table_file(data_dir, contract.IMPRESSIONS)
    raw_products = _read(products_path, contract.PRODUCTS, set(contract.PRODUCT_COLUMNS))
    raw_impressions = _read(
        impressions_path, contract.IMPRESSIONS, {*contract.IMPRESSION_COLUMNS, TIMESTAMP}
    )
    time_column = (
        "day" if "day" in raw_impressions or TIMESTAMP not in raw_impressions else TIMESTAMP
    )
    product_required = [
        c for c in contract.PRODUCT_COLUMNS if c not in contract.OPTIONAL_PRODUCT_COLUMNS
    ]
    impression_required = [c for c in contract.IMPRESSION_COLUMNS if c not in ("search_id", "day")]
    # Fail fast on a wrong schema or an empty table, before any image is opened.
    schema = [
        _require_columns(context, products_path, raw_products, product_required),
        _require_columns(
            context, impressions_path, raw_impressions, [*impression_required, time_column]
        ),
    ]
    for path, raw, table in (
        (products_path, raw_products, contract.PRODUCTS),
        (impressions_path, raw_impressions, contract.IMPRESSIONS),
    ):
        if raw.empty:
            raise DataError(f"{path}: no rows: an empty {table} table leaves nothing to train on")

    log.info(
        "validate: read %d products (%s), %d impressions (%s); checking every image",
        len(raw_products),
        products_path,
        len(raw_impressions),
        impressions_path,
    )
    image_started = time.perf_counter()
    products_view = _product_view(raw_products, data_dir)
    image_seconds = time.perf_counter() - image_started
    log.info("validate: %d images checked in %.1f s", len(products_view), image_seconds)
    products = _judge(
        context, contract.PRODUCTS, products_path, products_view, _product_checks(cfg), "product_id"
    )
    impressions_view = _impression_view(raw_impressions, time_column, products_view, products)
    derived_search_id = "search_id" not in raw_impressions
    impressions = _judge(
        context,
        contract.IMPRESSIONS,
        impressions_path,
        impressions_view,
        _impression_checks(cfg, time_column, with_search_id=not derived_search_id),
        "search_id",
    )

    verdicts = (products, impressions)
    report = ValidationReport(
        products_in=len(products_view),
        products_kept=len(products.kept),
        products_quarantined=len(products.quarantine),
        impressions_in=len(impressions_view),
        impressions_kept=len(impressions.kept),
        impressions_quarantined=len(impressions.quarantine),
        reasons={
            f"{v.table}/{reason}": int(n)
            for v in verdicts
            for reason, n in v.quarantine["reason"].value_counts().items()
        },
        seconds=time.perf_counter() - started,
    )
    log.info(
        "validate: products %d kept, %d quarantined; impressions %d kept, %d quarantined",
        report.products_kept,
        report.products_quarantined,
        report.impressions_kept,
        report.impressions_quarantined,
    )
    failures = [f for v in verdicts if (f := v.failure(cfg.max_quarantine_share))]
    summary = {
        "success": not failures,
        "failures": failures,
        "thresholds": cfg.model_dump(),
        "derived": {
            "search_id": derived_search_id,
            "day_from_timestamp": time_column == TIMESTAMP,
            "category_placeholder_rows": int(products_view["category_placeholder"].sum()),
        },
        "tables": {v.table: v.summary() for v in verdicts},
        "schema": [_expectation_summary(r) for result in schema for r in result.results],
        "reasons": report.reasons,
        "image_seconds": round(image_seconds, 3),
        "seconds_before_writing": round(report.seconds, 3),
    }
    publish_dir(out_dir, lambda staging: _write_outputs(staging, products, impressions, summary))
    if failures:
        raise DataError("; ".join(failures))
    return dataclasses.replace(report, seconds=time.perf_counter() - started)


# --- reading -------------------------------------------------------------------------------------


def _read(path: Path, table: str, columns: set[str]) -> pd.DataFrame:
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
            raise DataError(f"{path}: not a readable CSV file ({_first_line(err)})") from err
    try:
        names = [name for name in pq.read_schema(path).names if name in columns]
        arrow = pq.read_table(path, columns=names)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(err)})") from err
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


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# --- derived columns ---------------------------------------------------------------------------


def _escape_bad_bytes(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(raw with undecodable bytes spelled out as \\xNN, True where it had none; NA where null).

    GX fingerprints every batch with pandas' hashing, which cannot encode surrogate escapes.
    """
    if not (raw.dtype == object or isinstance(raw.dtype, pd.StringDtype)):
        return raw, pd.Series(True, index=raw.index, dtype="boolean").mask(raw.isna())
    found = raw.astype("string").str.contains(_UNDECODED_BYTE, regex=True)
    bad = found.fillna(False).to_numpy(dtype=bool)
    escaped = raw.copy()
    if bad.any():
        escaped[bad] = raw[bad].map(
            lambda v: v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        )
    return escaped, ~found


def _text(raw: pd.Series, blank_is_null: bool) -> tuple[pd.Series, pd.Series]:
    """(the column as pandas strings, whether each value was valid UTF-8)."""
    text, utf8_ok = _escape_bad_bytes(raw.astype("string"))
    return (text.mask(text.str.strip() == "") if blank_is_null else text), utf8_ok


# Derived numbers are float64 (NaN = absent), not Int64: GX vectorizes range checks only on
# numpy dtypes and runs a Python function per value otherwise.


def _to_int(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(whole-number values, whether each present value is integer-castable; NA where null)."""
    numbers = pd.to_numeric(raw, errors="coerce").astype("float64")
    integral = np.isfinite(numbers) & (numbers == np.floor(numbers)) & (numbers.abs() < 2**53)
    return numbers.where(integral), pd.Series(integral, dtype="boolean").mask(raw.isna())


def _day_from_timestamp(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(day = whole days since the earliest stamp's date, whether each stamp parsed)."""
    if pd.api.types.is_datetime64_any_dtype(raw):
        stamps = pd.to_datetime(raw, utc=True)
    elif pd.api.types.is_numeric_dtype(raw):
        stamps = pd.to_datetime(raw, unit="s", errors="coerce", utc=True)
    else:
        stamps = pd.to_datetime(raw, errors="coerce", utc=True, format="ISO8601")
    dates = stamps.dt.floor("D")
    days = (dates - dates.min()).dt.days.astype("float64")
    return days, pd.Series(stamps.notna(), dtype="boolean").mask(raw.isna())


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


def _probe_images(image_paths: pd.Series, data_dir: Path) -> pd.DataFrame:
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


def _product_view(raw: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    """The products with the derived columns their suite judges."""
    view = pd.DataFrame(index=raw.index)
    for column in contract.PRODUCT_COLUMNS:
        given = raw[column] if column in raw else pd.Series(pd.NA, index=raw.index, dtype="string")
        view[column], view[f"{column}_utf8_ok"] = _text(given, column in _BLANK_IS_NULL)
    view["category_placeholder"] = view["category"].isna()
    view["category"] = view["category"].fillna(contract.NO_CATEGORY)
    view["product_id_repeated"] = (
        view["product_id"]
        .duplicated(keep="first")
        .astype("boolean")
        .mask(view["product_id"].isna())
    )
    view["title_chars"] = view["title"].str.strip().str.len().astype("float64")
    return view.join(_probe_images(view["image_path"], data_dir))


def _impression_view(
    raw: pd.DataFrame, time_column: str, products_view: pd.DataFrame, products: _Verdict
) -> pd.DataFrame:
    """The impressions with the derived columns their suite judges (search_id derived if absent)."""
    view = pd.DataFrame(index=raw.index)
    for column in (c for c in _STRING_IMPRESSION_COLUMNS if c in raw):
        view[column], view[f"{column}_utf8_ok"] = _text(raw[column], column in _BLANK_IS_NULL)
    for column in (c for c in _INT_IMPRESSION_COLUMNS if c != "day"):
        view[column] = _escape_bad_bytes(raw[column])[0]
        view[f"{column}_int"], view[f"{column}_type_ok"] = _to_int(view[column])
    view[time_column] = _escape_bad_bytes(raw[time_column])[0]
    view["day_int"], view[f"{time_column}_type_ok"] = (
        _to_int(view["day"]) if time_column == "day" else _day_from_timestamp(view[TIMESTAMP])
    )
    view["query_chars"] = view["query"].str.strip().str.len().astype("float64")
    # The same impression twice (an export run twice, a join gone wrong): every given field
    # equal. Without search_id or timestamp two identical searches on one day look the same.
    given = [c for c in view.columns if c in (*contract.IMPRESSION_COLUMNS, TIMESTAMP)]
    view["impression_repeated"] = view[given].duplicated(keep="first")
    if "search_id" not in view:
        view["search_id"] = _derive_search_ids(view["day_int"], view["query"])

    # Foreign key: a product must have survived its own validation, not merely be listed.
    kept_ids = set(products_view.loc[products.kept, "product_id"])
    dropped = products.quarantine.assign(
        product_id=products_view["product_id"].loc[products.quarantine["row"]].to_numpy()
    )
    dropped_reason = dropped.drop_duplicates("product_id").set_index("product_id")["reason"]
    product_id = view["product_id"]
    view["product_status"] = pd.Series(
        np.select(
            [product_id.isin(kept_ids), product_id.isin(dropped_reason.index)],
            ["ok", "product_quarantined"],
            "unknown_product",
        ),
        index=view.index,
        dtype="string",
    ).mask(product_id.isna())
    view["product_reason"] = product_id.map(dropped_reason).astype("string")
    return view


def _derive_search_ids(day: pd.Series, query: pd.Series) -> pd.Series:
    keys = (f"{d:.0f}\x1f{q}".encode() for d, q in zip(day, query, strict=True))
    return pd.Series(
        [hashlib.blake2b(k, digest_size=8).hexdigest() for k in keys],
        index=day.index,
        dtype="string",
    )


# --- Great Expectations --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Check:
    """One expectation and the quarantine reason(s) its unexpected rows get."""

    expectation: Expectation
    details: Mapping[str, str]  # reason code -> detail template, formatted with the row's fields
    by_value: bool  # a status column's failing value *is* the reason (image_status "corrupt_image")

    @property
    def fields(self) -> list[str]:
        """The row fields the detail templates use."""
        parsed = (Formatter().parse(template) for template in self.details.values())
        return sorted({name for fields in parsed for _, name, _, _ in fields if name})


def _check(expectation: Expectation, details: Mapping[str, str], by_value: bool = False) -> _Check:
    # The reason codes ride in the expectation's meta, so the data docs show them too.
    expectation.meta = {"quarantine_reason": " | ".join(details)}
    return _Check(expectation, details, by_value)


def _gx() -> ModuleType:
    """great_expectations, imported on first use: the import alone costs ~1.5 s."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations

    return great_expectations


def _gx_context() -> AbstractDataContext:
    """An in-memory context: nothing on disk but our own outputs, no progress bars."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = _gx().get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _run_suite(
    context: AbstractDataContext,
    name: str,
    frame: pd.DataFrame,
    expectations: Iterable[Expectation],
) -> ExpectationSuiteValidationResult:
    gx = _gx()
    batch_definition = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    # COMPLETE: every unexpected row's index, which is the row number in the input file.
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    for r in result.results:
        if r.exception_info.get("raised_exception"):
            raise RuntimeError(
                f"{name}: {r.expectation_config.type} raised: "
                f"{r.exception_info.get('exception_message')}"
            )
    return result


def _require_columns(
    context: AbstractDataContext, path: Path, frame: pd.DataFrame, required: list[str]
) -> ExpectationSuiteValidationResult:
    expect = _gx().expectations
    result = _run_suite(
        context,
        f"{path.stem}_columns",
        frame.head(0),
        [expect.ExpectColumnToExist(column=c) for c in required],
    )
    absent = {r.expectation_config.kwargs["column"] for r in result.results if not r.success}
    missing = [c for c in required if c in absent]
    if missing:
        noun = "column" if len(missing) == 1 else "columns"
        raise DataError(f"{path}: missing {noun} {', '.join(repr(c) for c in missing)}")
    return result


def _utf8_check(column: str) -> _Check:
    return _check(
        _gx().expectations.ExpectColumnValuesToBeInSet(
            column=f"{column}_utf8_ok", value_set=[True]
        ),
        {f"invalid_utf8:{column}": f"{column} has bytes that are not UTF-8: {{{column}}}"},
    )


def _null_check(column: str) -> _Check:
    return _check(
        _gx().expectations.ExpectColumnValuesToNotBeNull(column=column),
        {f"null:{column}": f"{column} is missing (null or blank)"},
    )


def _type_check(column: str, kind: str) -> _Check:
    return _check(
        _gx().expectations.ExpectColumnValuesToBeInSet(
            column=f"{column}_type_ok", value_set=[True]
        ),
        {f"bad_type:{column}": f"{column} '{{{column}}}' is not {kind}"},
    )


def _product_checks(cfg: ValidateConfig) -> list[_Check]:
    """The products suite, in reason priority order."""
    expect = _gx().expectations
    columns = list(contract.PRODUCT_COLUMNS)
    return [
        *(_utf8_check(c) for c in columns),
        *(_null_check(c) for c in columns if c not in contract.OPTIONAL_PRODUCT_COLUMNS),
        _check(
            expect.ExpectColumnValuesToBeInSet(column="product_id_repeated", value_set=[False]),
            {"duplicate_product_id": "product_id {product_id!r} already appears on an earlier row"},
        ),
        _check(
            expect.ExpectColumnValuesToBeBetween(column="title_chars", min_value=1),
            {"empty_title": "title {title!r} is blank"},
        ),
        _check(
            expect.ExpectColumnValuesToBeBetween(
                column="title_chars", max_value=cfg.max_title_chars
            ),
            {
                "title_too_long": "title has {title_chars:.0f} characters, "
                f"above {cfg.max_title_chars}"
            },
        ),
        _check(
            expect.ExpectColumnValuesToBeInSet(column="image_status", value_set=["ok"]),
            {
                "image_outside_data_dir": "image path {image_path!r} is outside the data directory",
                "missing_image": "image {image_path} is missing or not a readable file",
                "corrupt_image": "image {image_path} does not decode as an image",
            },
            by_value=True,
        ),
        _check(
            expect.ExpectColumnValuesToBeBetween(
                column="image_min_side", min_value=cfg.min_image_side
            ),
            {
                "image_too_small": "image {image_path} is {image_width:.0f}x{image_height:.0f} px, "
                f"below {cfg.min_image_side}"
            },
        ),
    ]


def _impression_checks(cfg: ValidateConfig, time_column: str, with_search_id: bool) -> list[_Check]:
    """The impressions suite, in reason priority order."""
    expect = _gx().expectations
    texts = [c for c in _STRING_IMPRESSION_COLUMNS if with_search_id or c != "search_id"]
    integers = [c for c in _INT_IMPRESSION_COLUMNS if c != "day"]
    return [
        *(_utf8_check(c) for c in texts),
        *(_null_check(c) for c in [*texts, *integers, time_column]),
        *(_type_check(c, "an integer") for c in integers),
        _type_check(time_column, "an integer" if time_column == "day" else "a time"),
        _check(
            expect.ExpectColumnValuesToBeInSet(column="impression_repeated", value_set=[False]),
            {"duplicate_impression": "an earlier row is the same impression (every field equal)"},
        ),
        _check(
            expect.ExpectColumnValuesToBeBetween(column="query_chars", min_value=1),
            {"empty_query": "query {query!r} is blank"},
        ),
        _check(
            expect.ExpectColumnValuesToBeBetween(
                column="query_chars", max_value=cfg.max_query_chars
            ),
            {
                "query_too_long": "query has {query_chars:.0f} characters, "
                f"above {cfg.max_query_chars}"
            },
        ),
        _check(
            expect.ExpectColumnValuesToBeBetween(
                column="position_int", min_value=1, max_value=cfg.max_position
            ),
            {
                "position_out_of_range": "position {position_int:.0f} is "
                f"outside 1..{cfg.max_position}"
            },
        ),
        _check(
            expect.ExpectColumnValuesToBeInSet(column="clicked_int", value_set=[0, 1]),
            {"clicked_not_binary": "clicked {clicked_int:.0f} is not 0 or 1"},
        ),
        _check(
            expect.ExpectColumnValuesToBeBetween(column="day_int", min_value=0),
            {"negative_day": "day {day_int:.0f} is negative"},
        ),
        _check(
            expect.ExpectColumnValuesToBeInSet(column="product_status", value_set=["ok"]),
            {
                "unknown_product": "product_id {product_id!r} is not in the products table",
                "product_quarantined": "product {product_id!r} was quarantined ({product_reason})",
            },
            by_value=True,
        ),
    ]


@dataclasses.dataclass(frozen=True)
class _Verdict:
    """One table's judged rows: what GX said, which rows go to quarantine and why."""

    table: str
    path: Path
    view: pd.DataFrame = dataclasses.field(repr=False)
    checks: list[_Check] = dataclasses.field(repr=False)
    result: ExpectationSuiteValidationResult = dataclasses.field(repr=False)
    quarantine: pd.DataFrame = dataclasses.field(
        repr=False
    )  # QUARANTINE_COLUMNS, one row per rejected row
    kept: pd.Index = dataclasses.field(repr=False)

    @property
    def share(self) -> float:
        return _share(len(self.quarantine), len(self.view))

    def failure(self, limit: float) -> str | None:
        """Why this table fails the stage: too much quarantined, or nothing left; else None."""
        counts = self.quarantine["reason"].value_counts()
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items())
        if self.share > limit:
            return (
                f"{self.path}: {self.share:.1%} of rows quarantined (limit {limit:.1%}): {reasons}"
            )
        if self.kept.empty:
            return f"{self.path}: every row quarantined ({reasons}): nothing left to train on"
        return None

    def summary(self) -> dict[str, object]:
        by_id = {r.expectation_config.id: r for r in self.result.results}
        return {
            "file": str(self.path),
            "rows_in": len(self.view),
            "rows_kept": len(self.kept),
            "rows_quarantined": len(self.quarantine),
            "quarantine_share": self.share,
            "reasons": {k: int(n) for k, n in self.quarantine["reason"].value_counts().items()},
            "gx_success": bool(self.result.success),
            "expectations": [_expectation_summary(by_id[c.expectation.id]) for c in self.checks],
        }


def _judge(
    context: AbstractDataContext,
    table: str,
    path: Path,
    view: pd.DataFrame,
    checks: list[_Check],
    key_column: str,
) -> _Verdict:
    """Run the table's suite; a row GX reports unexpected takes its first failing check's reason."""
    result = _run_suite(context, table, view, (c.expectation for c in checks))
    by_id = {r.expectation_config.id: r for r in result.results}
    taken = np.zeros(len(view), dtype=bool)
    parts = []
    for check in checks:  # priority order
        rows = np.asarray(
            by_id[check.expectation.id].result.get("unexpected_index_list") or [], dtype=np.int64
        )
        rows = rows[~taken[rows]]
        if not rows.size:
            continue
        taken[rows] = True
        failing = view.iloc[rows]
        if check.by_value:
            reasons = failing[check.expectation.column].astype(str).to_numpy()
        else:
            reasons = np.full(rows.size, next(iter(check.details)), dtype=object)
        records = failing[check.fields].to_dict("records") if check.fields else [{}] * rows.size
        details = [
            check.details[reason].format_map(record)
            for reason, record in zip(reasons, records, strict=True)
        ]
        parts.append(
            pd.DataFrame(
                {
                    "table": table,
                    "row": rows,
                    "key": failing[key_column].to_numpy(),
                    "reason": reasons,
                    "detail": details,
                }
            )
        )
    quarantine = (
        pd.concat(parts, ignore_index=True).sort_values("row", ignore_index=True)
        if parts
        else pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_COLUMNS})
    )
    return _Verdict(table, path, view, checks, result, quarantine, view.index[~taken])


def _expectation_summary(r: ExpectationValidationResult) -> dict[str, object]:
    config = r.expectation_config
    return {
        "expectation": config.type,
        "column": config.kwargs.get("column"),
        "kwargs": {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "column")},
        "quarantine_reason": (config.meta or {}).get("quarantine_reason"),
        "success": bool(r.success),
        "element_count": r.result.get("element_count"),
        "unexpected_count": r.result.get("unexpected_count", 0),
    }


# --- writing -------------------------------------------------------------------------------------


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _kept_products(products: _Verdict) -> pd.DataFrame:
    kept = products.view.loc[products.kept, list(contract.PRODUCT_COLUMNS)]
    return kept.astype("string").reset_index(drop=True)


def _kept_impressions(impressions: _Verdict) -> pd.DataFrame:
    kept = impressions.view.loc[impressions.kept]
    return (
        pd.DataFrame(
            {
                column: kept[column].astype("string") if kind == "string" else kept[f"{column}_int"]
                for column, kind in contract.IMPRESSION_COLUMNS.items()
            }
        )
        .astype(contract.IMPRESSION_COLUMNS)
        .reset_index(drop=True)
    )


def _data_docs(result: ExpectationSuiteValidationResult) -> str:
    """GX's own HTML page for one suite's result (rendered directly: no filesystem context)."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    for r in result.results:
        # A pandas query listing every unexpected row: megabytes on a bad day, and
        # quarantine.parquet already holds those rows.
        r.result.pop("unexpected_index_query", None)
    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))


def _write_outputs(
    staging: Path, products: _Verdict, impressions: _Verdict, summary: Mapping[str, object]
) -> None:
    _kept_products(products).to_parquet(staging / PRODUCTS_FILE, index=False)
    _kept_impressions(impressions).to_parquet(staging / IMPRESSIONS_FILE, index=False)
    quarantine = pd.concat([products.quarantine, impressions.quarantine], ignore_index=True)
    quarantine = quarantine.astype(
        {"table": "string", "row": "int64", "key": "string", "reason": "string", "detail": "string"}
    )
    quarantine.to_parquet(staging / QUARANTINE_FILE, index=False)
    (staging / REPORT_FILE).write_text(
        json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
    )
    docs = staging / DATA_DOCS_DIR
    docs.mkdir()
    for verdict in (products, impressions):
        (docs / f"{verdict.table}.html").write_text(_data_docs(verdict.result), encoding="utf-8")
