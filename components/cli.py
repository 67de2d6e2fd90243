"""The `ace` command line: thin wrappers over components and flows."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from components.config import PARAMS_FILE, Params, load_params
from components.errors import AceError

app = typer.Typer(
    help="ace: ACE-BERT multimodal e-commerce retrieval, run as an MLOps pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Produce and inspect the input data.", no_args_is_help=True)
stage_app = typer.Typer(
    help="Run single pipeline stages (what dvc.yaml calls).", no_args_is_help=True
)
pipeline_app = typer.Typer(
    help="Run the whole pipeline; keep dvc.yaml in step.", no_args_is_help=True
)
flows_app = typer.Typer(help="Prefect deployments of the pipeline.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(stage_app, name="stage")
app.add_typer(pipeline_app, name="pipeline")
features_app = typer.Typer(help="Inspect the image features.", no_args_is_help=True)
index_app = typer.Typer(help="The champion's product index.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(flows_app, name="flows")
app.add_typer(features_app, name="features")

T = TypeVar("T")
ParamsOption = Annotated[Path, typer.Option("--params", help="The params file to read.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a param, e.g. -S synth.scale=tiny (repeatable)."),
]
DvcOption = Annotated[
    bool, typer.Option(help="Record the new data version with `dvc add` (when data.dvc exists).")
]


def _parse_overrides(pairs: list[str] | None) -> dict[str, object]:
    import yaml

    overrides: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AceError(f"--set {pair!r}: expected KEY=VALUE, e.g. synth.scale=tiny")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _params(path: Path, pairs: list[str] | None = None) -> Params:
    return load_params(path, _parse_overrides(pairs))


@data_app.command("synth")
def data_synth(
    scale: Annotated[
        str | None, typer.Option(help="tiny | demo | bench (default: params synth.scale).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default: params synth.seed).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: params paths.data_dir).")
    ] = None,
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Generate the synthetic shop world (catalog, images, click log, hidden truth)."""
    from components.data.world import generate_world

    overrides = _parse_overrides(set_)
    if scale is not None:
        overrides["synth.scale"] = scale
    if seed is not None:
        overrides["synth.seed"] = seed
    params = load_params(params_file, overrides)
    out_dir = out or params.paths.data_dir
    summary = generate_world(params.synth, out_dir)
    typer.echo(
        f"wrote {out_dir}: {summary.n_products} products, {summary.n_impressions} impressions "
        f"over {summary.days} days ({summary.test_days} test) in {summary.seconds:.1f}s "
        f"({summary.products_per_second:.0f} products/s)"
    )


@data_app.command("append")
def data_append(
    days: Annotated[int | None, typer.Option(help="Days to add (default: append.days).")] = None,
    drift: Annotated[
        list[str] | None,
        typer.Option(help="season | new_category | query_mix | clicks (repeatable; default none)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Stream of the new searches.")] = None,
    dvc: DvcOption = True,
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Append further days (optionally drifted) to the world in paths.data_dir: new data."""
    from components.data.world.append import append_days

    overrides = _parse_overrides(set_)
    for key, value in (("append.days", days), ("append.drift", drift), ("append.seed", seed)):
        if value is not None:
            overrides[key] = value
    params = load_params(params_file, overrides)
    summary = append_days(params.paths.data_dir, params.append)
    typer.echo(
        f"appended days {summary.first_day}-{summary.first_day + summary.days - 1} "
        f"(drift: {', '.join(summary.drift) or 'none'}): {summary.n_impressions} impressions, "
        f"{summary.new_products} new products, {summary.new_queries} new queries "
        f"in {summary.seconds:.1f}s"
    )
    if dvc:
        _record_data_version(params.paths.data_dir)


def _record_data_version(data_dir: Path) -> None:
    """`dvc add` the data folder when it is DVC-tracked (its .dvc file exists)."""
    import subprocess

    from components.ops import tracking

    dvc_file = Path(f"{data_dir}.dvc")
    if dvc_file.exists():
        # The dvc installed beside this ace first: PATH may not hold the environment's bin.
        beside = Path(sys.executable).parent / "dvc"
        dvc = str(beside) if beside.exists() else shutil.which("dvc")
        if dvc is None:
            raise AceError(
                f"{dvc_file}: the data is DVC-tracked but no `dvc` command was found to record "
                "the new version: install dvc, or pass --no-dvc"
            )
        done = subprocess.run([dvc, "add", "-q", str(data_dir)], capture_output=True, text=True)
        if done.returncode:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise AceError(f"dvc add {data_dir} failed: {lines[-1] if lines else done.returncode}")
        typer.echo(f"new data version {tracking.data_version(dvc_file)} in {dvc_file}")


@data_app.command("import")
def data_import(
    kind: Annotated[
        str,
        typer.Argument(help="amazon | shopify | gmc (a product export), or clicks (a click log)."),
    ],
    source: Annotated[Path, typer.Argument(help="The export: CSV, TSV, XML (gmc) or Parquet.")],
    images: Annotated[
        Path | None,
        typer.Option(help="Folder of product images, matched by product id or by file name."),
    ] = None,
    fetch_images: Annotated[
        bool,
        typer.Option(
            "--fetch-images",
            help="Download images not found in --images from their http(s) URLs "
            "(timeout, size and content checked; failures quarantined).",
        ),
    ] = False,
    category_level: Annotated[
        int | None,
        typer.Option(
            help="Category path level: 1 = the top, 0 = the last (import.category_level)."
        ),
    ] = None,
    map_: Annotated[
        list[str] | None,
        typer.Option("--map", help="FIELD=COLUMN: read a field from this column (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Data folder to write (default: params paths.data_dir).")
    ] = None,
    dvc: DvcOption = True,
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Import a shop's product export (Amazon, Shopify, Merchant Center) or a click log."""
    from components.data import importers

    overrides = _parse_overrides(set_)
    if category_level is not None:
        overrides["import.category_level"] = category_level
    params = load_params(params_file, overrides)
    out_dir = out or params.paths.data_dir
    if kind == "clicks":
        mapping = importers.parse_mapping(map_, importers.CLICK_FIELDS)
        report = importers.import_clicks(source, out_dir, mapping)
    else:
        mapping = importers.parse_mapping(map_, importers.PRODUCT_FIELDS)
        report = importers.import_products(
            source, kind, out_dir, params.import_, images, fetch_images, mapping
        )
    typer.echo(report.summary())
    if dvc:
        _record_data_version(out_dir)


@stage_app.command("list")
def stage_list() -> None:
    """List the stages in pipeline order."""
    from components.stages import STAGES

    for stage in STAGES:
        typer.echo(f"{stage.name:<12} {stage.description}")


@stage_app.command("run")
def stage_run(
    name: Annotated[str, typer.Argument(help="The stage to run (see `ace stage list`).")],
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Run one stage as an MLflow run and write its outputs and metrics."""
    from contextlib import nullcontext

    from components.ops import tracking
    from components.stages import get_stage, run_stage
    from components.training import distributed

    stage = get_stage(name)
    params = _params(params_file, set_)
    # Under `dvc repro` / `dvc exp run`, the stages of one invocation share a parent run (made
    # by rank 0 alone under torchrun: the other ranks record nothing).
    shared = (
        tracking.dvc_parent_run(params.tracking.experiment, name)
        if distributed.is_main()
        else nullcontext()
    )
    with shared as parent:
        metrics = run_stage(stage, params, parent_run_id=parent)
    for key, value in metrics.items():
        typer.echo(f"{key}: {value:g}")


# Without PREFECT_API_URL a flow starts a temporary Prefect server in a subprocess; Prefect's 20 s
# for it to answer is too short on a busy 2-core machine.
EPHEMERAL_STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_STARTUP_SECONDS = "120"


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed task's or flow's exception with its traceback; for a user's error
    (an AceError: bad data, no champion) the log line stays and the traceback goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AceError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    user_errors = _UserErrorsWithoutTraceback()
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in [logging.getLogger("prefect"), *loggers]:
        if logger.name.startswith("prefect"):
            for handler in logger.handlers:
                if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in handler.filters):
                    handler.addFilter(user_errors)


def _in_process(run_flow: Callable[[], T]) -> T:
    """Run a flow in this process; a temporary Prefect server too slow to start is one line,
    and so is a user's error inside a task (its log lines stay, without a traceback)."""
    _quiet_user_errors()
    try:
        return run_flow()
    except RuntimeError as err:
        if "ephemeral Prefect API server" not in str(err):
            raise
        seconds = os.environ.get(EPHEMERAL_STARTUP_TIMEOUT, EPHEMERAL_STARTUP_SECONDS)
        raise AceError(
            f"the temporary Prefect server did not answer within {seconds} s (a busy machine?): "
            f"set {EPHEMERAL_STARTUP_TIMEOUT} higher, or start a server (`prefect server start`) "
            "and point PREFECT_API_URL at it"
        ) from err


@pipeline_app.command("run")
def pipeline_run(
    stage: Annotated[
        list[str] | None, typer.Option(help="Run only these stages (repeatable).")
    ] = None,
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Run the Prefect flow `ace` in this process (no server needed)."""
    from flows.ace import ace

    _in_process(
        lambda: ace(params_file=str(params_file), overrides=_parse_overrides(set_), stages=stage)
    )


@pipeline_app.command("retrain")
def pipeline_retrain(
    force: Annotated[bool, typer.Option(help="Retrain even without drift.")] = False,
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Run the Prefect flow behind `ace/retrain` in this process: monitor, retrain on drift."""
    from flows.retrain import retrain

    result = _in_process(
        lambda: retrain(params_file=str(params_file), overrides=_parse_overrides(set_), force=force)
    )
    typer.echo(f"{result['decision']}: {result['outcome']}")


@index_app.command("refresh")
def index_refresh(
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Add the products new since the champion to its index (the flow behind `ace/refresh`)."""
    from flows.refresh import refresh_index

    result = _in_process(
        lambda: refresh_index(params_file=str(params_file), overrides=_parse_overrides(set_))
    )
    typer.echo(result["outcome"])


@app.command("monitor")
def monitor_command(
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Drift report of the new days against the champion's training days (validate first)."""
    from components.ops.monitor import run_monitor

    params = _params(params_file, set_)
    summary = run_monitor(params)
    for name, signal in summary.signals.items():
        flag = "DRIFT" if signal["drifted"] else "ok"
        typer.echo(f"{name:<26} {signal['score']:>9.4f}  (threshold {signal['threshold']})  {flag}")
    for window in ("its_test_days", "latest_days", "new_days"):
        figures = getattr(summary, f"champion_on_{window}")
        if figures:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
            typer.echo(f"champion on {window.replace('_', ' ')}: {shown}")
    verdict = "drifted" if summary.drifted else "not drifted"
    typer.echo(f"{verdict}: {summary.reason} -> {params.paths.artifacts_dir / 'monitor'}")


@pipeline_app.command("dvc-yaml")
def pipeline_dvc_yaml(
    check: Annotated[bool, typer.Option(help="Fail if dvc.yaml differs; write nothing.")] = False,
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Render dvc.yaml from the stage registry."""
    from components.stages import render_dvc_yaml

    rendered = render_dvc_yaml(load_params(params_file))
    target = Path("dvc.yaml")
    if check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != rendered:
            raise AceError(
                "dvc.yaml is out of step with components/stages.py: run `ace pipeline dvc-yaml`"
            )
        typer.echo("dvc.yaml matches the stage registry")
        return
    target.write_text(rendered, encoding="utf-8")
    typer.echo(f"wrote {target}")


@features_app.command("show")
def features_show(
    product_id: Annotated[str, typer.Argument(help="The product to draw.")],
    out: Annotated[
        Path | None,
        typer.Option(help="PNG to write (default: <artifacts_dir>/show/roi_<product_id>.png)."),
    ] = None,
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Draw a product's image with its RoI and patch grid: what the model sees."""
    from components.features.features import show_product

    params = _params(params_file, set_)
    # Under the git-ignored artifacts folder unless asked: never litter the working directory.
    target = out or params.paths.artifacts_dir / "show" / f"roi_{product_id}.png"
    show_product(product_id, params, target)
    typer.echo(
        f"wrote {target}: {product_id}'s image, its RoI (red) and "
        f"{params.features.grid}x{params.features.grid} patch grid (yellow)"
    )


@flows_app.command("serve")
def flows_serve() -> None:
    """Serve the deployments `ace/full`, `ace/retrain` (weekly) and `ace/refresh` (daily)."""
    from flows.serve import serve_deployments

    serve_deployments()


@app.command("search")
def search(
    query: Annotated[
        str | None, typer.Argument(help="What a shopper types (or give --file).")
    ] = None,
    k: Annotated[
        int, typer.Option("--k", help="How many products (--file: for rows without a k).")
    ] = 10,
    sheet: Annotated[
        Path | None, typer.Option(help="Also write the results' images as a PNG contact sheet.")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Search every query of a .txt (one per line), .csv or .parquet (a 'query' "
            "column, an optional 'k' column) in batches, instead of QUERY.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="--file: the Parquet to write, one row per query and rank "
            "(default: <artifacts_dir>/search/<its stem>.parquet, e.g. queries.parquet)."
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="Registered model URI.")] = "models:/ace@champion",
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Search the catalogue with the champion retriever: top-K with titles (and images)."""
    from components.serving.search import contact_sheet, search_file, search_titles

    if (query is None) == (file is None):
        raise AceError(
            "give a QUERY or --file PATH, not both"
            if file is not None
            else "give a QUERY, or --file PATH for a file of queries"
        )
    if file is None and out is not None:
        raise AceError("--out goes with --file (one query's results are printed)")
    if file is not None and sheet is not None:
        raise AceError("--sheet draws one query's results: not with --file")
    params = load_params(params_file)
    if file is not None:
        summary = search_file(params, model, file, k, out, progress=True)
        typer.echo(summary.line())
        return
    assert query is not None
    results, warning = search_titles(params, model, query, k)
    if warning:
        typer.echo(f"warning: {query!r}: {warning}", err=True)
    for rank, row in enumerate(results.itertuples(), start=1):
        cached = " (hot-query cache)" if row.cached and rank == 1 else ""
        typer.echo(f"{rank:3d}. {row.score:.3f}  {row.product_id}  {row.title}{cached}")
    if sheet is not None:
        contact_sheet(params, results, query, sheet)
        typer.echo(f"wrote {sheet}")


@app.command("serve")
def serve_command(
    model: Annotated[str, typer.Option(help="Registered model URI.")] = "models:/ace@champion",
    host: Annotated[str | None, typer.Option(help="Default: params serving.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: params serving.port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Default: params serving.workers.")] = None,
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Serve a registered model over HTTP: MLflow's scoring protocol, with the request limits."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.ops import tracking
    from components.serving.server import serve

    cfg = _params(params_file, set_).serving
    # uvicorn's worker processes resolve models:/ URIs through the environment.
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    try:
        mlflow.models.get_model_info(model)
    except (MlflowException, OSError) as err:
        raise AceError(f"{model}: no such model ({_first_line(err)}); run the pipeline") from err
    serve(model, host or cfg.host, port or cfg.port, workers or cfg.workers)


def _first_line(err: BaseException) -> str:
    lines = str(getattr(err, "message", err)).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@app.command("compare")
def compare_variants(
    out: Annotated[Path, typer.Option(help="Folder for compare.md / compare.json / plots.")] = Path(
        "artifacts/compare"
    ),
    all_data: Annotated[
        bool, typer.Option("--all-data", help="Mix runs of every data version (default: current).")
    ] = False,
    period: Annotated[
        str, typer.Option(help="test (final figures) or val (what choices are made on).")
    ] = "test",
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Every variant and baseline (mean ± std over seeds), whole catalogue and slices."""
    import mlflow

    from components.ops import tracking
    from components.ops.compare import compare, plot_adversarial_curves, write

    params = load_params(params_file)
    experiment = params.tracking.experiment
    version = None if all_data else tracking.data_version()
    comparison = compare(experiment, version, period)
    typer.echo(comparison.report())
    written = write(comparison, out)
    curve = out / "semantic_loss_adversarial.png"
    if plot_adversarial_curves(experiment, version, curve):
        written.append(curve)
    with mlflow.start_run(run_name="compare"):
        mlflow.set_tags({**tracking.lineage_tags(), "stage": "compare"})
        for path in written:
            mlflow.log_artifact(str(path), artifact_path="compare")
    typer.echo("wrote " + ", ".join(str(p) for p in written))


@app.command("report")
def report_command(
    out: Annotated[
        Path | None, typer.Option(help="Also write the summary to this markdown file.")
    ] = None,
    params_file: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """The last run in short: test figures against the baselines, the gate, the champion."""
    from components.ops.report import render

    text = render(_params(params_file, set_))
    typer.echo(text, nl=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {out}")


def _command_index() -> str:
    """Every leaf command with its one-line help, so `ace --help` lists them all."""
    lines = []
    for command in app.registered_commands:
        summary = (command.callback.__doc__ or "").strip().splitlines()[0]
        lines.append(f"ace {command.name:<17} {summary}")
    for group in app.registered_groups:
        for command in group.typer_instance.registered_commands:
            summary = (command.callback.__doc__ or "").strip().splitlines()[0]
            lines.append(f"ace {group.name} {command.name:<10} {summary}")
    return "\n\n".join(lines)


def main() -> None:
    """Entry point: user-facing errors become one line on stderr and exit code 1."""
    app.info.epilog = _command_index()
    # MLflow announces its store migrations at INFO on stderr; a user needs only our own lines.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # The in-process Prefect server would try to send usage telemetry: there is no route out.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(EPHEMERAL_STARTUP_TIMEOUT, EPHEMERAL_STARTUP_SECONDS)
    # Progress bars for steps of a second: transformers draws "Writing model shards" for every
    # save of a one-file model and MLflow "Downloading artifacts" for every model it loads
    # (46 bars in `make demo`). The stages' own bars and progress lines stay.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        app()
    except AceError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
