"""The validate stage: Great Expectations judges catalog and click log; bad rows are quarantined.

Input is the data contract (components/data/contract.py): `products.{parquet|csv}` and
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

import dataclasses
import logging
import time
from pathlib import Path

from components.atomic import publish_dir
from components.config import ValidateConfig
from components.data import contract
from components.data.validate.expectations import (
    gx_context,
    impression_checks,
    product_checks,
    require_columns,
)
from components.data.validate.outputs import write_outputs
from components.data.validate.reading import check_csv_records, read_table
from components.data.validate.schema import (
    DATA_DOCS_DIR,
    IMPRESSIONS_FILE,
    PRODUCTS_FILE,
    QUARANTINE_COLUMNS,
    QUARANTINE_FILE,
    REPORT_FILE,
    TIMESTAMP,
    share,
)
from components.data.validate.verdicts import expectation_summary, judge
from components.data.validate.views import impression_view, product_view
from components.errors import DataError

__all__ = [
    "DATA_DOCS_DIR",
    "IMPRESSIONS_FILE",
    "PRODUCTS_FILE",
    "QUARANTINE_COLUMNS",
    "QUARANTINE_FILE",
    "REPORT_FILE",
    "ValidationReport",
    "check_csv_records",
    "validate_data",
]

log = logging.getLogger(__name__)


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
        return share(self.products_quarantined, self.products_in)

    @property
    def impressions_quarantine_share(self) -> float:
        return share(self.impressions_quarantined, self.impressions_in)

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
    context = gx_context()

    products_path = contract.table_file(data_dir, contract.PRODUCTS)
    impressions_path = contract.table_file(data_dir, contract.IMPRESSIONS)
    raw_products = read_table(products_path, contract.PRODUCTS, set(contract.PRODUCT_COLUMNS))
    raw_impressions = read_table(
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
        require_columns(context, products_path, raw_products, product_required),
        require_columns(
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
    products_view = product_view(raw_products, data_dir)
    image_seconds = time.perf_counter() - image_started
    log.info("validate: %d images checked in %.1f s", len(products_view), image_seconds)
    products = judge(
        context, contract.PRODUCTS, products_path, products_view, product_checks(cfg), "product_id"
    )
    impressions_view = impression_view(raw_impressions, time_column, products_view, products)
    derived_search_id = "search_id" not in raw_impressions
    impressions = judge(
        context,
        contract.IMPRESSIONS,
        impressions_path,
        impressions_view,
        impression_checks(cfg, time_column, with_search_id=not derived_search_id),
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
        "schema": [expectation_summary(r) for result in schema for r in result.results],
        "reasons": report.reasons,
        "image_seconds": round(image_seconds, 3),
        "seconds_before_writing": round(report.seconds, 3),
    }
    publish_dir(out_dir, lambda staging: write_outputs(staging, products, impressions, summary))
    if failures:
        raise DataError("; ".join(failures))
    return dataclasses.replace(report, seconds=time.perf_counter() - started)
