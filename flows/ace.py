"""The Prefect flow `ace`: every registered stage, in order, as a task; one MLflow parent run."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import tracking
from components.config import load_params
from components.stages import STAGES, Metrics, Stage, run_stage


def _stage_task(stage: Stage):
    # NO_CACHE: stage inputs are files on disk, which Prefect's input hashing cannot see;
    # skipping unchanged work is DVC's job.
    return task(run_stage, name=stage.name, cache_policy=NO_CACHE, retries=0)


@flow(name="ace", log_prints=True)
def ace(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    stages: list[str] | None = None,
    variant: str | None = None,
) -> dict[str, Metrics]:
    """Run the pipeline: validate -> ... ; `stages` picks a subset, `overrides` sets params,
    `variant` the paper's model (twinbert, fashionbert, cebert, cebert_hot, cebert_adv, acebert)."""
    if variant is not None:
        overrides = {**(overrides or {}), "model.variant": variant}
    params = load_params(params_file, overrides)
    logger = get_run_logger()
    selected = [s for s in STAGES if stages is None or s.name in stages]
    unknown = set(stages or []) - {s.name for s in STAGES}
    if unknown:
        raise ValueError(f"unknown stages: {sorted(unknown)}")
    tracking.use_experiment(params.tracking.experiment)
    results: dict[str, Metrics] = {}
    with mlflow.start_run(run_name="pipeline") as parent:
        mlflow.set_tags({**tracking.lineage_tags(), "stage": "pipeline"})
        mlflow.log_params(
            {"stages": ",".join(s.name for s in selected), "params_file": params_file}
        )
        for stage in selected:
            logger.info("stage %s: %s", stage.name, stage.description)
            results[stage.name] = _stage_task(stage)(stage, params, parent.info.run_id)
    return results
