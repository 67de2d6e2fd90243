"""The Prefect flow behind the scheduled deployment `ace/retrain`: monitor, and retrain on drift.

validate -> features -> monitor; no drift (and not forced): stop after the report. Drift: the
rest of the pipeline on the updated data, promoting only through the gate. A retrain on the same
data against the same champion runs once (the registry remembers the attempt), tasks retry
transient failures, and nothing but the gate's last step touches the registry.
"""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.config import load_params
from components.ops import tracking
from components.ops.monitor import (
    champion_version,
    earlier_attempt,
    mark_attempt,
    retrain_key,
    run_monitor,
)
from components.stages import STAGES
from flows.ace import retrying_task, run_stages
from flows.publish import component_logs, publish_report

INPUT_STAGES = ["validate", "features"]  # the monitor needs the new data validated and embedded


@flow(name="ace", log_prints=True)
def retrain(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Validate the new data, report drift against the champion, and retrain when it drifted
    (or when `force`); promotion only through the gate."""
    params = load_params(params_file, overrides)
    cfg = params.retrain
    logger = get_run_logger()
    tracking.use_experiment(params.tracking.experiment)
    with component_logs(), mlflow.start_run(run_name="retrain") as parent:
        mlflow.set_tags({**tracking.lineage_tags(), "stage": "retrain", "forced": str(force)})
        parent_id = parent.info.run_id
        results: dict[str, Any] = run_stages(
            params, INPUT_STAGES, parent_id, cfg.task_retries, cfg.retry_delay_seconds
        )
        champion, _ = champion_version(params)
        key = retrain_key(params, champion)
        earlier = earlier_attempt(params, key)
        if earlier is not None and not force:
            outcome = (
                f"already retrained on this data against champion v{champion}: version "
                f"{earlier.version}, gate {earlier.tags.get('gate', 'unknown')}"
            )
            return _finish(results, "done before", outcome, logger)

        monitor_task = retrying_task(
            run_monitor, "monitor", cfg.task_retries, cfg.retry_delay_seconds
        )
        summary = monitor_task(params, parent_id)
        results["monitor"] = {"drifted": summary.drifted, "reason": summary.reason}
        if not summary.drifted and not force:
            return _finish(
                results, "no drift", f"stopping after the report: {summary.reason}", logger
            )

        rest = [s.name for s in STAGES if s.name not in INPUT_STAGES]
        results |= run_stages(params, rest, parent_id, cfg.task_retries, cfg.retry_delay_seconds)
        version = str(int(results["gate"]["version"]))
        mark_attempt(params, version, key)
        publish_report(params)
        if not results["gate"]["registered"]:
            outcome = f"the retrained model is identical to champion v{version}: nothing registered"
            return _finish(results, "identical", outcome, logger)
        passed = bool(results["gate"]["passed"])
        outcome = f"version {version} {'promoted to champion' if passed else 'refused by the gate'}"
        mlflow.set_tags({"model_version": version, "gate": "passed" if passed else "failed"})
        return _finish(results, "promoted" if passed else "refused", outcome, logger)


def _finish(results: dict[str, Any], decision: str, outcome: str, logger: Any) -> dict[str, Any]:
    logger.info("retrain: %s", outcome)
    mlflow.set_tags({"decision": decision})
    create_markdown_artifact(
        key="retrain-decision",
        markdown=f"**{decision}**: {outcome}",
        description="What the retrain run decided.",
    )
    return {**results, "decision": decision, "outcome": outcome}
