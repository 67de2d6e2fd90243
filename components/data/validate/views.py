"""Each table with the derived status columns its suite judges (types, UTF-8, duplicates, keys)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.data import contract
from components.data.validate.images import probe_images
from components.data.validate.schema import (
    BLANK_IS_NULL,
    INT_IMPRESSION_COLUMNS,
    STRING_IMPRESSION_COLUMNS,
    TIMESTAMP,
)

if TYPE_CHECKING:
    from components.data.validate.verdicts import Verdict

_UNDECODED_BYTE = r"[\udc80-\udcff]"  # what surrogateescape turns a non-UTF-8 byte into


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


def product_view(raw: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    """The products with the derived columns their suite judges."""
    view = pd.DataFrame(index=raw.index)
    for column in contract.PRODUCT_COLUMNS:
        given = raw[column] if column in raw else pd.Series(pd.NA, index=raw.index, dtype="string")
        view[column], view[f"{column}_utf8_ok"] = _text(given, column in BLANK_IS_NULL)
    view["category_placeholder"] = view["category"].isna()
    view["category"] = view["category"].fillna(contract.NO_CATEGORY)
    view["product_id_repeated"] = (
        view["product_id"]
        .duplicated(keep="first")
        .astype("boolean")
        .mask(view["product_id"].isna())
    )
    view["title_chars"] = view["title"].str.strip().str.len().astype("float64")
    return view.join(probe_images(view["image_path"], data_dir))


def impression_view(
    raw: pd.DataFrame, time_column: str, products_view: pd.DataFrame, products: Verdict
) -> pd.DataFrame:
    """The impressions with the derived columns their suite judges (search_id derived if absent)."""
    view = pd.DataFrame(index=raw.index)
    for column in (c for c in STRING_IMPRESSION_COLUMNS if c in raw):
        view[column], view[f"{column}_utf8_ok"] = _text(raw[column], column in BLANK_IS_NULL)
    for column in (c for c in INT_IMPRESSION_COLUMNS if c != "day"):
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
