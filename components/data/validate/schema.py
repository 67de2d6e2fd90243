"""The names validate's parts share: its output files and the contract's column groups."""

from __future__ import annotations

from components.data import contract
from components.data.clicklog import IMPRESSIONS_FILE, PRODUCTS_FILE

__all__ = ["IMPRESSIONS_FILE", "PRODUCTS_FILE"]  # what later stages read (clicklog.validated_table)
QUARANTINE_FILE = "quarantine.parquet"
REPORT_FILE = "validation.json"
DATA_DOCS_DIR = "data_docs"

TIMESTAMP = "timestamp"  # accepted in place of `day`
QUARANTINE_COLUMNS = ("table", "row", "key", "reason", "detail")
STRING_IMPRESSION_COLUMNS = tuple(
    c for c, k in contract.IMPRESSION_COLUMNS.items() if k == "string"
)
INT_IMPRESSION_COLUMNS = tuple(c for c, k in contract.IMPRESSION_COLUMNS.items() if k == "int64")
BLANK_IS_NULL = ("product_id", "category", "image_path", "search_id")  # titles/queries: own reason


def share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
