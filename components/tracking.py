"""MLflow plumbing: where runs go, and the lineage tags every run carries."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml

DEFAULT_TRACKING_DIR = Path("mlruns")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else SQLite under ./mlruns (MLflow 3 refuses a bare file store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_TRACKING_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_TRACKING_DIR / 'mlflow.db').resolve()}"


def artifact_root() -> str:
    """Artifacts live beside the SQLite store, so one folder holds the whole tracking state."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
    else:
        root = DEFAULT_TRACKING_DIR / "artifacts"
    return root.resolve().as_uri()


def use_experiment(name: str) -> str:
    """Point MLflow at our store and experiment (made with a local artifact root); its id."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_root())
    else:
        experiment_id = experiment.experiment_id
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
