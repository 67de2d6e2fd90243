"""What a flow run shows in Prefect's UI beyond its tasks: the stages' progress lines in the task
logs, and their figures as artifacts (each stage's metrics, the model against the baselines, the
gate's decision, the run's summary).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

from components.config import Params
from components.ops import report
from components.stages import Metrics, Stage

COMPONENTS = "components"  # the package whose loggers the stages write progress to


def _in_a_run(record: logging.LogRecord) -> bool:
    """Only a line logged inside a flow or task run can be filed under one."""
    try:
        get_run_context()
    except MissingContextError:
        return False
    return True


@contextmanager
def component_logs() -> Iterator[None]:
    """Send the `components.*` loggers' INFO lines (stage progress every N steps) to the Prefect
    run's logs, under the task that logs them. Prefect's `PREFECT_LOGGING_EXTRA_LOGGERS` would
    attach the handler too, but leaves the loggers at WARNING, so INFO lines would never come."""
    logger = logging.getLogger(COMPONENTS)
    handler = APILogHandler()
    handler.addFilter(_in_a_run)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def publish_stage(stage: Stage, params: Params, metrics: Metrics) -> None:
    """The stage's metrics as a table artifact on its task run (and so on the flow run); for
    evaluate also the model against each baseline, for the gate its decision."""
    create_table_artifact(
        key=f"{stage.name}-metrics",
        table=[{"metric": key, "value": value} for key, value in sorted(metrics.items())],
        description=f"**{stage.name}**: {stage.description}",
    )
    if stage.name == "evaluate":
        create_table_artifact(
            key="evaluate-models",
            table=report.comparison_rows(metrics, params.model.variant),
            description="The trained model and the baselines on the test days "
            "(`image_` columns: the image slice).",
        )
    if stage.name == "gate":
        create_markdown_artifact(
            key="gate-decision",
            markdown="\n\n".join(report.registry_lines(params)),
            description="The gate's decision and the champion it leaves.",
        )


def publish_report(params: Params) -> None:
    """`ace report` as the flow run's markdown artifact."""
    create_markdown_artifact(
        key="ace-report",
        markdown=report.render(params),
        description="The run in short: test figures against the baselines, gate, champion.",
    )
