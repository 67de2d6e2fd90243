"""A table's verdict: its suite run, and each rejected row's one reason (its first failure)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.data.validate.expectations import Check, run_suite
from components.data.validate.schema import QUARANTINE_COLUMNS, share

if TYPE_CHECKING:
    from great_expectations.core import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.data_context import AbstractDataContext


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One table's judged rows: what GX said, which rows go to quarantine and why."""

    table: str
    path: Path
    view: pd.DataFrame = dataclasses.field(repr=False)
    checks: list[Check] = dataclasses.field(repr=False)
    result: ExpectationSuiteValidationResult = dataclasses.field(repr=False)
    quarantine: pd.DataFrame = dataclasses.field(
        repr=False
    )  # QUARANTINE_COLUMNS, one row per rejected row
    kept: pd.Index = dataclasses.field(repr=False)

    @property
    def share(self) -> float:
        return share(len(self.quarantine), len(self.view))

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
            "expectations": [expectation_summary(by_id[c.expectation.id]) for c in self.checks],
        }


def judge(
    context: AbstractDataContext,
    table: str,
    path: Path,
    view: pd.DataFrame,
    checks: list[Check],
    key_column: str,
) -> Verdict:
    """Run the table's suite; a row GX reports unexpected takes its first failing check's reason."""
    result = run_suite(context, table, view, (c.expectation for c in checks))
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
    return Verdict(table, path, view, checks, result, quarantine, view.index[~taken])


def expectation_summary(r: ExpectationValidationResult) -> dict[str, object]:
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
