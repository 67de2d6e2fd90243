"""What validate publishes: the kept rows, the quarantine, the report and GX's data docs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from components.data import contract
from components.data.validate.schema import (
    DATA_DOCS_DIR,
    IMPRESSIONS_FILE,
    PRODUCTS_FILE,
    QUARANTINE_FILE,
    REPORT_FILE,
)
from components.data.validate.verdicts import Verdict

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult


def _kept_products(products: Verdict) -> pd.DataFrame:
    kept = products.view.loc[products.kept, list(contract.PRODUCT_COLUMNS)]
    return kept.astype("string").reset_index(drop=True)


def _kept_impressions(impressions: Verdict) -> pd.DataFrame:
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


def write_outputs(
    staging: Path, products: Verdict, impressions: Verdict, summary: Mapping[str, object]
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
