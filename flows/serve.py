"""Serve the pipeline's deployments to a running Prefect server: `ace flows serve`."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.ace import ace


def deployments() -> list[RunnerDeployment]:
    """The deployments this project offers, by name: `ace/full`."""
    full = ace.to_deployment(
        name="full",
        description="Every stage from validate onwards on the data in data/.",
        tags=["ace"],
    )
    return [full]


def serve_deployments() -> None:
    """Register the deployments and run their flow runs in this process until interrupted."""
    serve(*deployments())


if __name__ == "__main__":
    serve_deployments()
