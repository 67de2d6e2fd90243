"""MLflow plumbing: where runs go, and the lineage tags every run carries."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import yaml

log = logging.getLogger(__name__)

DEFAULT_TRACKING_DIR = Path("mlruns")
# Where new experiments keep their artifacts, when not beside the SQLite store.
ARTIFACT_ROOT_ENV = "ACE_ARTIFACT_ROOT"
# The experiment's declared kind: model training, not a GenAI app, for the MLflow clients and UIs
# that read it. (MLflow 3.17's own UI picks its view from a sidebar switch, or from
# `?workflowType=machine_learning` in the address: README.)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# Every column in which MLflow's SQLite store keeps an absolute artifact path.
STORED_PATHS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else SQLite under ./mlruns (MLflow 3 refuses a bare file store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_TRACKING_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_TRACKING_DIR / 'mlflow.db').resolve()}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_root() -> str:
    """`ACE_ARTIFACT_ROOT` if set, else `artifacts/` beside the SQLite store, so one folder holds
    the whole tracking state. MLflow fixes it per experiment, when the experiment is made."""
    configured = os.environ.get(ARTIFACT_ROOT_ENV)
    if configured:
        return configured if "://" in configured else Path(configured).resolve().as_uri()
    db = _sqlite_file(tracking_uri())
    root = db.parent / "artifacts" if db else DEFAULT_TRACKING_DIR / "artifacts"
    return root.resolve().as_uri()


def follow_moved_store(stored_root: str) -> bool:
    """Rewrite the store's artifact paths when the store was copied or moved; True if it did.

    MLflow keeps artifact locations as absolute paths (it resolves relative ones), so a copied
    project's `mlruns/mlflow.db` still points into the original folder, and new runs would write
    there. When the experiment's root is an `artifacts/` folder beside another store of the same
    name, every stored path under that old store folder is moved to this one's.
    """
    db = _sqlite_file(tracking_uri())
    if db is None or ARTIFACT_ROOT_ENV in os.environ or not stored_root.startswith("file://"):
        return False
    here = db.resolve().parent
    old_root = Path(urlparse(stored_root).path)
    old = old_root.parent
    if old == here or old_root.name != "artifacts" or old.name != here.name:
        return False
    with sqlite3.connect(db) as connection:
        for table, column in STORED_PATHS:
            columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            if column in columns:
                connection.execute(
                    f"UPDATE {table} SET {column} = replace({column}, ?, ?) "
                    f"WHERE instr({column}, ?) > 0",
                    (f"{old}/", f"{here}/", f"{old}/"),
                )
    log.warning(
        "%s: the store was copied or moved from %s; its artifact paths now lie in %s", db, old, here
    )
    return True


def use_experiment(name: str) -> str:
    """Point MLflow at our store and experiment (made with our artifact root, tagged as model
    training); its id."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(
            name, artifact_location=artifact_root(), tags=dict([EXPERIMENT_KIND])
        )
    else:
        experiment_id = experiment.experiment_id
        follow_moved_store(experiment.artifact_location)
        key, kind = EXPERIMENT_KIND
        if key not in experiment.tags:  # made before ace tagged its experiments
            mlflow.MlflowClient().set_experiment_tag(experiment_id, key, kind)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit(repo: Path = Path(".")) -> str:
    """HEAD's sha, suffixed with '-dirty' when tracked files changed; 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def data_version(dvc_file: Path = Path("data.dvc")) -> str:
    """The md5 that `dvc add data` recorded in data.dvc; 'untracked' without one."""
    try:
        outs = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"


def lineage_tags() -> dict[str, str]:
    return {"git_commit": git_commit(), "data_version": data_version()}


@contextmanager
def stage_run(
    experiment: str, run_name: str, params: dict[str, object], parent_run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage, nested under the pipeline run when `parent_run_id` is given.

    The parent is passed explicitly rather than read from MLflow's active-run stack, which is
    thread-local and so invisible to a Prefect task running in a worker thread.
    """
    use_experiment(experiment)
    with mlflow.start_run(
        run_name=run_name, nested=parent_run_id is not None, parent_run_id=parent_run_id
    ) as run:
        mlflow.set_tags({**lineage_tags(), "stage": run_name})
        mlflow.log_params(flatten(params))
        yield run


# How far apart the DVC process's start and its parent run's may seem: wall-clock adjustments
# (seen: 24 s on a busy VM) shift what the OS reports as a process's start time.
_CLOCK_SLACK_SECONDS = 300


@dataclass(frozen=True)
class DvcInvocation:
    pid: int
    started: float  # seconds since the epoch, as the OS reports it
    args: list[str]  # after `dvc`


def dvc_invocation() -> DvcInvocation | None:
    """The `dvc repro` / `dvc exp run` process this stage command runs under; None outside DVC."""
    if "DVC_STAGE" not in os.environ:  # DVC sets it for every stage command
        return None
    import psutil

    try:
        for process in psutil.Process().parents():
            args = process.cmdline()
            # `dvc ...` is `<python> <venv>/bin/dvc ...` (or `python -m dvc ...`) once started.
            for i, arg in enumerate(args[:3]):
                if Path(arg).name == "dvc":
                    return DvcInvocation(process.pid, process.create_time(), args[i + 1 :])
    except psutil.Error:
        return None
    return None


@contextmanager
def dvc_parent_run(experiment: str, stage: str) -> Iterator[str | None]:
    """The MLflow run that every stage of one `dvc repro` or `dvc exp run` nests under, as the
    Prefect flow's stages nest under its pipeline run; None (no parent) outside DVC.

    Each stage is its own `ace stage run` process: the first creates the parent, tagged with the
    DVC process's id, and the later ones find it by that tag among the runs started since that
    process did. It is RUNNING while a stage runs, FINISHED after it (FAILED if the stage
    failed), and lists the stages run so far.
    """
    invocation = dvc_invocation()
    if invocation is None:
        yield None
        return
    experiment_id = use_experiment(experiment)
    client = mlflow.MlflowClient()
    since = int((invocation.started - _CLOCK_SLACK_SECONDS) * 1000)
    found = client.search_runs(
        [experiment_id],
        f"tags.dvc_invocation = '{invocation.pid}' and attributes.start_time >= {since}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run = found[0]
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        args = invocation.args
        # Named like the command ("dvc repro", "dvc exp run <its DVC experiment name>").
        name = " ".join(["dvc", *[a for a in args if not a.startswith("-")][:2]])
        tags = {**lineage_tags(), "stage": "pipeline", "dvc_invocation": str(invocation.pid)}
        tags["dvc_command"] = " ".join(["dvc", *args])
        dvc_experiment = os.environ.get("DVC_EXP_NAME")
        if dvc_experiment:
            tags["dvc_experiment"] = dvc_experiment
            name = f"dvc exp run {dvc_experiment}"
        run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    stages = [s for s in run.data.tags.get("stages", "").split(",") if s]
    client.set_tag(run_id, "stages", ",".join([*stages, stage]))
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)


def flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
