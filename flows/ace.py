"""The Prefect flow `ace`: every registered stage, in order, as a task; one MLflow parent run.

Each task's log carries its stage's progress lines, and its metrics are published as artifacts
(flows/publish.py); a run that reaches the gate ends with the `ace report` summary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlflow
from prefect import Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun

from components.config import Params, load_params
from components.errors import AceError
from components.ops import tracking
from components.stages import STAGES, Metrics, Stage, run_stage
from flows.publish import component_logs, publish_report, publish_stage


def run_and_publish(stage: Stage, params: Params, parent_run_id: str | None = None) -> Metrics:
    """One stage as an MLflow run, its figures published as the task's artifacts."""
    metrics = run_stage(stage, params, parent_run_id)
    publish_stage(stage, params, metrics)
    return metrics


def retry_unless_user_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry what may be transient; a user's error (bad data, no champion: an AceError) fails
    at once, since running it again cannot help."""
    try:
        state.result()
    except AceError:
        return False
    except Exception:
        return True
    return True


def retrying_task(fn: Callable, name: str, retries: int = 0, retry_delay_seconds: int = 0) -> Task:
    """`fn` as a task of the pipeline's flows: retried unless a user's error, never cached.

    NO_CACHE: inputs are files on disk, which Prefect's input hashing cannot see; skipping
    unchanged work is DVC's job."""
    return task(
        fn,
        name=name,
        cache_policy=NO_CACHE,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_unless_user_error,
    )


def stage_task(stage: Stage, retries: int = 0, retry_delay_seconds: int = 0) -> Task:
    return retrying_task(run_and_publish, stage.name, retries, retry_delay_seconds)


def run_stages(
    params: Params, names: list[str], parent_run_id: str, retries: int = 0, delay: int = 0
) -> dict[str, Metrics]:
    """The named stages, in registry order, each a task nested under `parent_run_id`."""
    logger = get_run_logger()
    results: dict[str, Metrics] = {}
    for stage in (s for s in STAGES if s.name in names):
        logger.info("stage %s: %s", stage.name, stage.description)
        results[stage.name] = stage_task(stage, retries, delay)(stage, params, parent_run_id)
    return results


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
    unknown = set(stages or []) - {s.name for s in STAGES}
    if unknown:
        raise ValueError(f"unknown stages: {sorted(unknown)}")
    selected = [s.name for s in STAGES if stages is None or s.name in stages]
    tracking.use_experiment(params.tracking.experiment)
    with component_logs(), mlflow.start_run(run_name="pipeline") as parent:
        mlflow.set_tags({**tracking.lineage_tags(), "stage": "pipeline"})
        mlflow.log_params({"stages": ",".join(selected), "params_file": params_file})
        results = run_stages(params, selected, parent.info.run_id)
        if "gate" in results:
            publish_report(params)
        return results
