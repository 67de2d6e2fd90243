"""Serve the pipeline's deployments to a running Prefect server: `ace flows serve`."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from components.config import PARAMS_FILE, load_params
from flows.ace import ace
from flows.refresh import refresh_index
from flows.retrain import retrain


def deployments(params_file: str = str(PARAMS_FILE)) -> list[RunnerDeployment]:
    """`ace/full` (on demand), `ace/retrain` (weekly: the cron in params `retrain`) and
    `ace/refresh` (daily: params `refresh`)."""
    params = load_params(params_file)
    schedule = params.retrain
    full = ace.to_deployment(
        name="full",
        description="Every stage from validate onwards on the data in data/.",
        tags=["ace"],
    )
    scheduled = retrain.to_deployment(
        name="retrain",
        description="Validate new data, report drift against the champion, retrain on drift.",
        tags=["ace"],
        schedule=Cron(schedule.cron, timezone=schedule.timezone),
        concurrency_limit=1,  # two retrains at once would race for the same artifacts
    )
    daily = refresh_index.to_deployment(
        name="refresh",
        description="Add the products new since the champion to its index; through the gate.",
        tags=["ace"],
        schedule=Cron(params.refresh.cron, timezone=params.refresh.timezone),
        concurrency_limit=1,
    )
    return [full, scheduled, daily]


def serve_deployments() -> None:
    """Register the deployments and run their flow runs in this process until interrupted."""
    serve(*deployments())


if __name__ == "__main__":
    serve_deployments()
