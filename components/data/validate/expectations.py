"""Great Expectations plumbing and the two suites: every row-level check, in priority order."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from string import Formatter
from types import ModuleType
from typing import TYPE_CHECKING

import pandas as pd

from components.config import ValidateConfig
from components.data import contract
from components.data.validate.schema import INT_IMPRESSION_COLUMNS, STRING_IMPRESSION_COLUMNS
from components.errors import DataError

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation


@dataclasses.dataclass(frozen=True)
class Check:
    """One expectation and the quarantine reason(s) its unexpected rows get."""

    expectation: Expectation
    details: Mapping[str, str]  # reason code -> detail template, formatted with the row's fields
    by_value: bool  # a status column's failing value *is* the reason (image_status "corrupt_image")

    @property
    def fields(self) -> list[str]:
        """The row fields the detail templates use."""
        parsed = (Formatter().parse(template) for template in self.details.values())
        return sorted({name for fields in parsed for _, name, _, _ in fields if name})


def _check(expectation: Expectation, details: Mapping[str, str], by_value: bool = False) -> Check:
    # The reason codes ride in the expectation's meta, so the data docs show them too.
    expectation.meta = {"quarantine_reason": " | ".join(details)}
    return Check(expectation, details, by_value)


def _gx() -> ModuleType:
    """great_expectations, imported on first use: the import alone costs ~1.5 s."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations

    return great_expectations


def gx_context() -> AbstractDataContext:
    """An in-memory context: nothing on disk but our own outputs, no progress bars."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = _gx().get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def run_suite(
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


def require_columns(
    context: AbstractDataContext, path: Path, frame: pd.DataFrame, required: list[str]
) -> ExpectationSuiteValidationResult:
    expect = _gx().expectations
    result = run_suite(
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


def _utf8_check(column: str) -> Check:
    return _check(
        _gx().expectations.ExpectColumnValuesToBeInSet(
            column=f"{column}_utf8_ok", value_set=[True]
        ),
        {f"invalid_utf8:{column}": f"{column} has bytes that are not UTF-8: {{{column}}}"},
    )


def _null_check(column: str) -> Check:
    return _check(
        _gx().expectations.ExpectColumnValuesToNotBeNull(column=column),
        {f"null:{column}": f"{column} is missing (null or blank)"},
    )


def _type_check(column: str, kind: str) -> Check:
    return _check(
        _gx().expectations.ExpectColumnValuesToBeInSet(
            column=f"{column}_type_ok", value_set=[True]
        ),
        {f"bad_type:{column}": f"{column} '{{{column}}}' is not {kind}"},
    )


def product_checks(cfg: ValidateConfig) -> list[Check]:
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


def impression_checks(cfg: ValidateConfig, time_column: str, with_search_id: bool) -> list[Check]:
    """The impressions suite, in reason priority order."""
    expect = _gx().expectations
    texts = [c for c in STRING_IMPRESSION_COLUMNS if with_search_id or c != "search_id"]
    integers = [c for c in INT_IMPRESSION_COLUMNS if c != "day"]
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
