"""Serve the pipeline's deployments to a running Prefect server: `ace flows serve`."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from components.config import PARAMS_FILE, load_params
from flows.ace import ace
from flows.retrain import retrain


def deployments(params_file: str = str(PARAMS_FILE)) -> list[RunnerDeployment]:
    """`ace/full` (on demand) and `ace/retrain` (on the cron schedule in params `retrain`)."""
    schedule = load_params(params_file).retrain
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
    return [full, scheduled]


def serve_deployments() -> None:
    """Register the deployments and run their flow runs in this process until interrupted."""
    serve(*deployments())


if __name__ == "__main__":
    serve_deployments()
