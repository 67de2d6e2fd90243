"""The pipeline shell: stage registry, dvc.yaml, the Prefect flow, MLflow lineage, the CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.config import ConfigError, Params, load_params
from components.ops import tracking
from components.stages import (
    CHARTS,
    STAGES,
    get_stage,
    render_dvc_yaml,
    run_stage,
    source_file,
)
from tests.conftest import ROOT, TINY_OVERRIDES

BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def test_dvc_yaml_is_rendered_from_the_registry(repo_params: Params):
    assert (ROOT / "dvc.yaml").read_text(encoding="utf-8") == render_dvc_yaml(repo_params)


def test_every_stage_reads_existing_sections_and_code(repo_params: Params):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for stage in STAGES:
        for name in stage.params:  # a section, or one dotted key of it
            node = raw
            for key in name.split("."):
                assert key in node, f"{stage.name}: {name}"
                node = node[key]
        for module in stage.modules:
            assert source_file(module) is not None, f"{stage.name}: {module}"
    assert STAGES[0].name == "validate"


def test_stage_code_is_the_import_closure_of_its_modules(tmp_path: Path):
    from components.stages import code_files

    finetune = code_files(("components.training.finetune",))
    # Direct, indirect (finetune -> evaluator -> retrieval_metrics) and the config everything reads.
    for source in (
        "training/finetune",
        "models/adversary",
        "retrieval/evaluator",
        "retrieval/retrieval_metrics",
        "config",
        "errors",
    ):
        assert f"components/{source}.py" in finetune, source
    assert (
        "components/data/validate/__init__.py" not in finetune
        and "components/stages.py" not in finetune
    )
    # A module imported only inside a function counts too; one outside `components` does not.
    package = tmp_path / "components"
    package.mkdir()
    (package / "a.py").write_text("import numpy\n\ndef f():\n    from components import b\n")
    (package / "b.py").write_text("from components.c import x\nfrom components.sub import e\n")
    (package / "c.py").write_text("x = 1\n")
    (package / "d.py").write_text("")
    # A sub-package: its modules count, its empty __init__.py does not, a non-empty one does.
    (package / "sub").mkdir()
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "e.py").write_text("from components.pkg import f\n")
    (package / "pkg").mkdir()
    (package / "pkg" / "__init__.py").write_text("f = 1\n")
    found = code_files(("components.a",), root=tmp_path)
    assert found == [
        "components/a.py",
        "components/b.py",
        "components/c.py",
        "components/pkg/__init__.py",
        "components/sub/e.py",
    ]


def test_bad_params_name_the_file_and_field(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["validate"]["max_quarantine_share"] = 2
    bad.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"params\.yaml.*max_quarantine_share"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not one of"):
        load_params(ROOT / "params.yaml", {"synth.scale": "huge"})


def test_stage_run_logs_params_metrics_and_lineage(tiny_params: Params, tiny_world: Path):
    metrics = run_stage(get_stage("validate"), tiny_params)
    run = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name(tiny_params.tracking.experiment).experiment_id]
    )[0]
    assert run.data.tags["stage"] == "validate"
    assert run.data.tags["git_commit"] == tracking.git_commit()
    assert run.data.tags["data_version"] == tracking.data_version()
    assert run.data.params["validate.max_quarantine_share"] == str(
        tiny_params.validate_.max_quarantine_share
    )
    assert run.data.metrics["products_in"] == metrics["products_in"] > 0
    written = yaml.safe_load(get_stage("validate").metrics_file(tiny_params).read_text())
    assert written == {k: v for k, v in metrics.items() if not k.endswith("seconds")}
    assert "seconds" in metrics and "seconds" not in written


def test_data_version_reads_data_dvc(tmp_path: Path):
    dvc_file = tmp_path / "data.dvc"
    dvc_file.write_text("outs:\n- md5: abc123.dir\n  path: data\n", encoding="utf-8")
    assert tracking.data_version(dvc_file) == "abc123.dir"
    assert tracking.data_version(tmp_path / "missing.dvc") == "untracked"


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_nothing_and_compares_experiments(
    tmp_path: Path, tiny_world: Path, mlflow_store: str
):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("components", "dvc.yaml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, work / name)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    # No floors: the tiny model passes the gate, so the experiment below can fail it.
    floors = {"gate.min_gauc": 0.0, "gate.min_recall_at_100": 0.0, "gate.min_student_fidelity": 0.0}
    for dotted, value in {**TINY_OVERRIDES, **floors}.items():
        *parents, key = dotted.split(".")
        node = raw
        for parent in parents:
            node = node[parent]
        node[key] = value
    (work / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    (work / ".gitignore").write_text("/data/\n__pycache__/\n", encoding="utf-8")
    shutil.copytree(tiny_world, work / "data")
    identity = {"GIT_AUTHOR_NAME": "ace", "GIT_AUTHOR_EMAIL": "ace@localhost"}
    identity |= {"GIT_COMMITTER_NAME": "ace", "GIT_COMMITTER_EMAIL": "ace@localhost"}
    env = _env(MLFLOW_TRACKING_URI=mlflow_store, **identity)

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done

    run("git", "init", "-q")
    run(BIN / "dvc", "init", "-q")
    first = run(BIN / "dvc", "repro")
    for stage in STAGES:
        assert f"Running stage '{stage.name}'" in first.stdout
    assert (work / "artifacts" / "validate" / "products.parquet").is_file()
    assert (work / "artifacts" / "features" / "manifest.json").is_file()
    assert (work / "artifacts" / "pretrain" / "model" / "model.safetensors").is_file()
    assert (work / "artifacts" / "finetune" / "model" / "model.safetensors").is_file()
    evaluated = json.loads((work / "metrics" / "evaluate.json").read_text())
    assert {"recall_at_100", "bm25_recall_at_100", "gauc"} <= evaluated.keys()
    assert (work / "dvc.lock").is_file()
    second = run(BIN / "dvc", "repro")
    assert "Running stage" not in second.stdout

    # The stages of one `dvc repro` share one MLflow parent run, as the Prefect flow's do.
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name("ace")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("dvc_command") == "dvc repro"]
    assert parent.info.run_name == "dvc repro" and parent.info.status == "FINISHED"
    assert parent.data.tags["stages"] == ",".join(s.name for s in STAGES)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(s.name for s in STAGES)
    # What DVC shows is what MLflow recorded: the evaluate run's figures, to the last digit.
    (evaluate_run,) = [r for r in children if r.data.tags["stage"] == "evaluate"]
    for key in ("gauc", "recall_at_100", "bm25_recall_at_100"):
        assert evaluate_run.data.metrics[key] == pytest.approx(evaluated[key], rel=1e-12), key

    # Metrics and plot data are in git: a DVC experiment's commit holds its own, so DVC
    # compares experiments with numbers (not `!`).
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    # Other serving limits make another bundle (the same one again would not be registered).
    strict = run(
        BIN / "dvc", "exp", "run", "-n", "strict-gate",
        "-S", "gate.min_gauc=0.99", "-S", "serving.limits.max_k=999",
    )  # fmt: skip
    assert "Running stage 'gate'" in strict.stdout
    assert "Running stage 'evaluate'" not in strict.stdout
    diff = json.loads(run(BIN / "dvc", "metrics", "diff", "HEAD", "strict-gate", "--json").stdout)
    assert diff["metrics/gate.json"]["passed"] == {"old": 1.0, "new": 0.0, "diff": -1.0}
    assert diff["metrics/gate.json"]["version"] == {"old": 1.0, "new": 2.0, "diff": 1.0}
    shown = run(BIN / "dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", "Experiment|^gauc$")
    table = list(csv.DictReader(shown.stdout.splitlines()))
    assert [float(row["gauc"]) for row in table] == [evaluated["gauc"]] * len(table)
    (strict_run,) = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("dvc_experiment") == "strict-gate"
    ]
    assert strict_run.info.run_name == "dvc exp run strict-gate"

    plots = json.loads(run(BIN / "dvc", "plots", "diff", "HEAD", "strict-gate", "--json").stdout)
    assert plots.get("errors", []) == []
    for chart in ("plots/finetune/main_loss.csv", "plots/recall/model.csv", *CHARTS):
        (rendered,) = plots["data"][chart]
        assert rendered["revisions"] == ["HEAD", "strict-gate"]


@pytest.mark.slow
def test_prefect_flow_runs_stages_nested_under_one_pipeline_run(
    tiny_params: Params, tiny_world: Path
):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler
    from prefect.testing.utilities import prefect_test_harness

    from components.retrieval.baselines import NAMES
    from flows.ace import ace

    overrides = {
        **TINY_OVERRIDES,
        "paths.data_dir": str(tiny_params.paths.data_dir),
        "paths.artifacts_dir": str(tiny_params.paths.artifacts_dir),
    }
    with prefect_test_harness():
        state = ace(params_file=str(ROOT / "params.yaml"), overrides=overrides, return_state=True)
        results = state.result()
        flow_run = state.state_details.flow_run_id
        APILogHandler().flush()
        with get_client(sync_client=True) as prefect:
            artifacts = prefect.read_artifacts(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run]))
            )
            logs = prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])))
    assert set(results) == {s.name for s in STAGES}
    assert results["validate"]["products_kept"] > 0
    # The fine-tuned baseline stops at its step cap, short of its epoch.
    baselines = results["baselines"]
    assert baselines["st_finetune_steps"] == TINY_OVERRIDES["baselines.max_steps"]
    assert baselines["st_finetune_pairs"] > 3 * tiny_params.baselines.batch_size

    # The Prefect UI's view: progress lines in the tasks' logs, figures as artifacts.
    progress = [log for log in logs if log.name == "components.features.features"]
    assert progress and all(log.task_run_id is not None for log in progress)
    assert progress[-1].message.startswith(f"features: {results['features']['n_products']:.0f}/")
    by_key = {a.key: a for a in artifacts}
    assert {f"{s.name}-metrics" for s in STAGES} | {"evaluate-models", "gate-decision"} <= set(
        by_key
    )
    table = json.loads(by_key["evaluate-metrics"].data)  # table artifacts hold JSON
    assert {row["metric"]: row["value"] for row in table}["gauc"] == results["evaluate"]["gauc"]
    models = [row["model"] for row in json.loads(by_key["evaluate-models"].data)]
    assert models == [tiny_params.model.variant, *sorted(NAMES)]  # every baseline, beside ace
    version = int(results["gate"]["version"])
    assert f"Gate: version {version} " in by_key["gate-decision"].data
    assert by_key["ace-report"].data.startswith(f"## ace: {tiny_params.model.variant} on")

    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name(tiny_params.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["stage"] for r in children} == {s.name for s in STAGES}
    logged = {
        r.data.tags["stage"]: {
            a.path for a in client.list_artifacts(r.info.run_id, r.data.tags["stage"])
        }
        for r in children
    }
    assert {"pretrain/model", "pretrain/training_curve.png"} <= logged["pretrain"]
    assert {"finetune/model", "finetune/training_curve.png"} <= logged["finetune"]
    assert {"evaluate/recall_curve.png", "evaluate/embedding_map.png"} <= logged["evaluate"]


def test_flow_takes_the_variant_as_a_parameter():
    from flows.ace import ace

    assert "variant" in ace.parameters.properties
    with pytest.raises(ConfigError, match=r"model\.variant"):
        ace.fn(params_file=str(ROOT / "params.yaml"), variant="nobert")


def test_cli_help_lists_every_command():
    result = subprocess.run(
        [BIN / "ace", "--help"], capture_output=True, text=True, env=_env(), check=True
    )
    from components.cli import app

    help_text = " ".join(result.stdout.split())
    for command in app.registered_commands:
        assert f"ace {command.name}" in help_text
    for group in app.registered_groups:
        for command in group.typer_instance.registered_commands:
            assert f"ace {group.name} {command.name}" in help_text


def test_cli_errors_are_one_line(tmp_path: Path):
    result = subprocess.run(
        [BIN / "ace", "stage", "run", "validate", "-S", f"paths.data_dir={tmp_path / 'nowhere'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0]


def test_pipeline_run_explains_a_temporary_prefect_server_too_slow_to_start(tmp_path: Path):
    env = _env(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        PREFECT_SERVER_EPHEMERAL_ENABLED="true",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",  # as if the machine were swamped
    )
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run(
        [BIN / "ace", "pipeline", "run", "--stage", "validate"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: the temporary Prefect server did not answer within 0 s (a busy machine?): set "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or start a server (`prefect "
        "server start`) and point PREFECT_API_URL at it"
    ]


def test_a_users_error_inside_a_flow_is_one_line_and_not_retried(tmp_path: Path):
    """`ace index refresh` in a folder without data: the validate task fails at once (no
    retries for an AceError) and the user sees log lines and one error, no traceback."""
    from prefect.states import Failed

    from components.errors import DataError
    from flows.ace import retry_unless_user_error

    assert not retry_unless_user_error(None, None, Failed(data=DataError("bad row")))
    assert retry_unless_user_error(None, None, Failed(data=ConnectionError("went away")))

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run(
        [BIN / "ace", "index", "refresh"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Retry" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: data/products.parquet: file not found (expected products.parquet or products.csv)"
    ]
