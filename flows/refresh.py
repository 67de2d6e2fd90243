"""The Prefect flow behind the daily deployment `ace/refresh`: new products into the champion's
index without a retrain (components/serving/refresh.py).

validate -> features (only the new products' images are computed) -> refresh; the refreshed
bundle is promoted only through the gate's checks. With nothing new it registers nothing, so a
retried or repeated run is harmless.
"""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.config import load_params
from components.ops import tracking
from components.serving.refresh import run_refresh
from flows.ace import retrying_task, run_stages
from flows.publish import component_logs

INPUT_STAGES = ["validate", "features"]  # the new products validated, their images embedded


@flow(name="ace", log_prints=True)
def refresh_index(
    params_file: str = "params.yaml", overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Validate the data, compute the new products' features, and add them to a new version of
    the champion's index; promoted only if it passes the gate."""
    params = load_params(params_file, overrides)
    cfg = params.refresh
    logger = get_run_logger()
    tracking.use_experiment(params.tracking.experiment)
    with component_logs(), mlflow.start_run(run_name="refresh") as parent:
        mlflow.set_tags({**tracking.lineage_tags(), "stage": "refresh"})
        parent_id = parent.info.run_id
        results: dict[str, Any] = run_stages(
            params, INPUT_STAGES, parent_id, cfg.task_retries, cfg.retry_delay_seconds
        )
        refresh_task = retrying_task(
            run_refresh, "refresh", cfg.task_retries, cfg.retry_delay_seconds
        )
        figures = refresh_task(params, parent_id)
        results["refresh"] = figures
        outcome = describe(figures)
        logger.info("refresh: %s", outcome)
        mlflow.set_tags({"outcome": outcome})
        create_markdown_artifact(
            key="refresh-decision", markdown=outcome, description="What the refresh did."
        )
        return {**results, "outcome": outcome}


def describe(figures: dict[str, float]) -> str:
    """The refresh's outcome in one line."""
    champion = int(figures["champion_version"])
    if not figures["registered"]:
        return f"nothing new: champion v{champion}'s index has every validated product"
    version, added = int(figures["version"]), int(figures["products_added"])
    verdict = "promoted to champion" if figures["passed"] else "refused by the gate"
    return f"version {version} (champion v{champion} + {added} new products) {verdict}"
