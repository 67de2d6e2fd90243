"""Each tool's own view: DVC's metrics and plot files, `ace report`, MLflow's experiment and
artifact root, the quiet loads. (The end-to-end DVC experiment and Prefect artifact checks run
with the pipeline in tests/test_pipeline.py.)"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.config import Params
from components.ops import plot_data, report, tracking
from components.stages import CHARTS, COMPARISON, STAGES, render_dvc_yaml
from tests.conftest import ROOT, make_params

BIN = Path(sys.executable).parent

# Evaluate's metrics as the evaluator names them: baselines by prefix, slices (`image_`,
# `text_`), the validation period (`val_`), exact search (`exact_`), and counts beside them.
EVALUATED = {
    "gauc": 0.75,
    "recall_at_10": 0.39,
    "recall_at_100": 0.80,
    "mrr": 0.30,
    "exact_recall_at_100": 0.81,
    "val_gauc": 0.99,
    "val_recall_at_100": 0.99,
    "bm25_gauc": 0.65,
    "bm25_recall_at_10": 0.22,
    "bm25_recall_at_100": 0.59,
    "bm25_exact_recall_at_100": 0.99,
    "st_zeroshot_hot_gauc": 0.73,
    "st_zeroshot_hot_recall_at_10": 0.31,
    "st_zeroshot_hot_recall_at_100": 0.82,
    "image_recall_at_100": 0.70,
    "text_recall_at_100": 0.85,
    "bm25_image_recall_at_100": 0.40,
    "queries": 150.0,
    "image_queries": 40.0,
    "n_products": 3000.0,
}


def test_metric_keys_split_into_model_slice_and_metric():
    assert report.split_key("gauc") == ("", "", "gauc")
    assert report.split_key("st_zeroshot_title_ndcg_at_10") == (
        "st_zeroshot_title",
        "",
        "ndcg_at_10",
    )
    assert report.split_key("image_recall_at_100") == ("", "image", "recall_at_100")
    assert report.split_key("bm25_image_mrr") == ("bm25", "image", "mrr")
    assert report.split_key("cold_gauc") == ("", "cold", "gauc")
    assert report.split_key("judged_ndcg_at_10") == ("", "judged", "ndcg_at_10")  # not a baseline
    for left_out in ("val_gauc", "val_bm25_recall_at_10", "exact_mrr", "bm25_exact_gauc"):
        assert report.split_key(left_out) is None  # not a headline test figure
    for not_headline in ("queries", "image_queries", "n_products", "ann_recall_at_100_vs"):
        assert report.split_key(not_headline) is None


def test_the_model_is_compared_with_the_strongest_baseline_per_metric():
    rows = report.model_figures(EVALUATED)
    assert [(r.name, r.slice) for r in rows] == [
        ("", ""),
        ("bm25", ""),
        ("st_zeroshot_hot", ""),
        ("", "image"),
        ("bm25", "image"),
        ("", "text"),
    ]
    # the strongest baseline differs per metric; exact and validation figures never count
    assert report.against_rivals(rows) == [
        "GAUC +0.020 (st_zeroshot_hot)",
        "Recall@10 +0.080 (st_zeroshot_hot)",
        "Recall@100 -0.020 (st_zeroshot_hot)",
    ]
    assert report.against_rivals(rows, "image") == ["Recall@100 +0.300 (bm25)"]
    comparison = report.comparison_rows(EVALUATED, "acebert")
    assert [r["model"] for r in comparison] == ["acebert", "bm25", "st_zeroshot_hot"]
    assert comparison[1]["image_recall_at_100"] == 0.40
    assert "image_recall_at_100" not in comparison[2]


def test_report_shows_baselines_gate_and_champion(tmp_path: Path):
    params = make_params((), tmp_path / "artifacts")
    assert "No evaluation yet" in report.render(params)

    metrics = params.paths.metrics_dir / "evaluate.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({k: v for k, v in EVALUATED.items() if "st_" not in k}))
    gate = {"passed": 0.0, "version": 2.0, "candidate_gauc": 0.75, "candidate_recall_at_100": 0.8}
    gate |= {"champion_gauc": 0.77, "champion_recall_at_100": 0.80}
    (params.paths.metrics_dir / "gate.json").write_text(json.dumps(gate))
    client = MlflowClient()
    client.create_registered_model("ace")
    champion = client.create_model_version("ace", source=str(tmp_path), tags={"gauc": "0.77"})
    client.set_registered_model_alias("ace", "champion", champion.version)
    client.set_model_version_tag("ace", champion.version, "variant", "acebert")
    refused = client.create_model_version("ace", source=str(tmp_path))
    client.set_model_version_tag("ace", refused.version, "failed_checks", "regression:gauc")

    text = report.render(params)
    assert "| **acebert** | 0.750 | 0.390 | 0.800 | 0.300 |" in text
    assert "| BM25 over titles | 0.650 | 0.220 | 0.590 | - |" in text
    assert "150 test queries, Recall@K over the whole catalogue of 3000 products." in text
    assert "Against the strongest baseline: GAUC +0.100 (bm25)" in text
    assert "Image slice (40 queries" in text and "there: Recall@100 +0.300 (bm25)." in text
    assert "Gate: version 2 failed: not promoted (GAUC 0.750, Recall@100 0.800)" in text
    assert "challenged (GAUC 0.770, Recall@100 0.800); failed checks: regression:gauc." in text
    assert "Champion: `models:/ace@champion` is version 1 (acebert; GAUC 0.770)." in text


def test_training_curves_are_window_means_and_replace_stale_series(tmp_path: Path):
    folder = tmp_path / "finetune"
    folder.mkdir()
    (folder / "adv_loss.csv").write_text("step,adv_loss\n1,0.5\n")  # from an earlier variant
    history = [{"step": s, "main_loss": float(s), "lr": 0.1} for s in range(1, 1001)]
    for record in history[4::5]:
        record["classifier_loss"] = 2.0
    plot_data.write_training_curves(history, folder, points=200)
    assert sorted(p.name for p in folder.iterdir()) == [
        "classifier_loss.csv",
        "lr.csv",
        "main_loss.csv",
    ]
    main = list(csv.reader((folder / "main_loss.csv").open()))
    assert main[0] == ["step", "main_loss"] and len(main) == 201
    assert main[1] == ["5", "3"] and main[-1] == ["1000", "998"]  # mean of steps 1..5, 996..1000
    assert len((folder / "classifier_loss.csv").read_text().splitlines()) == 201


def test_dvc_yaml_keeps_metrics_and_plot_data_in_git(repo_params: Params):
    rendered = yaml.safe_load(render_dvc_yaml(repo_params))
    ignored = []
    for stage in STAGES:
        entry = rendered["stages"][stage.name]
        (metrics,) = entry["metrics"]
        ((path, options),) = metrics.items()
        assert path == f"metrics/{stage.name}.json" and options == {"cache": False}
        files = [path]
        for item in entry.get("plots", []) + entry["outs"]:
            if isinstance(item, dict) and next(iter(item.values())).get("cache") is False:
                files.append(next(iter(item)))
        check = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True)
        ignored += check.stdout.decode().split()
    assert ignored == []  # git keeps every one, so each experiment's commit holds its own
    assert {t: next(iter(d.values()))["x"] for d in rendered["plots"] for t in d} == CHARTS
    for chart in rendered["plots"]:
        assert next(iter(chart.values()))["y"] == {f"plots/{COMPARISON}": "model"}
    assert rendered["stages"]["finetune"]["plots"] == [
        {"plots/finetune": {"cache": False, "x": "step"}}
    ]


def test_new_experiment_is_model_training_and_keeps_artifacts_beside_the_store(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    experiment = mlflow.get_experiment(tracking.use_experiment("views"))
    assert experiment.tags[tracking.EXPERIMENT_KIND[0]] == "custom_model_development"
    store = Path(mlflow_store.removeprefix("sqlite:///")).parent
    assert experiment.artifact_location == (store / "artifacts").as_uri()

    monkeypatch.setenv(tracking.ARTIFACT_ROOT_ENV, str(tmp_path / "elsewhere"))
    other = mlflow.get_experiment(tracking.use_experiment("views-elsewhere"))
    assert other.artifact_location == (tmp_path / "elsewhere").as_uri()


def test_a_copied_project_writes_into_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    original, copy = tmp_path / "original", tmp_path / "copy"
    (original / "mlruns").mkdir(parents=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{original / 'mlruns' / 'mlflow.db'}")
    tracking.use_experiment("ace")
    with mlflow.start_run() as old_run:
        mlflow.log_text("before the copy", "note.txt")
    mlflow.set_tracking_uri("sqlite:///unused")  # let go of the original's engine
    shutil.copytree(original, copy)
    before = sorted(p for p in original.rglob("*") if p.is_file() and p.suffix != ".db")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlruns' / 'mlflow.db'}")
    experiment_id = tracking.use_experiment("ace")
    assert mlflow.get_experiment(experiment_id).artifact_location.startswith(copy.as_uri())
    with mlflow.start_run() as new_run:
        mlflow.log_text("after the copy", "note.txt")
    assert (copy / "mlruns" / "artifacts" / new_run.info.run_id / "artifacts" / "note.txt").exists()
    old = MlflowClient().get_run(old_run.info.run_id)
    assert old.info.artifact_uri.startswith(copy.as_uri())
    fetched = mlflow.artifacts.download_artifacts(run_id=old.info.run_id, dst_path=str(tmp_path))
    assert Path(fetched, "note.txt").read_text() == "before the copy"
    after = sorted(p for p in original.rglob("*") if p.is_file() and p.suffix != ".db")
    assert after == before  # nothing written into the original


def test_synth_takes_set_overrides(tmp_path: Path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    small = [f"synth.scales.tiny.{k}=30" for k in ("n_products", "n_queries", "searches_per_day")]
    result = subprocess.run(
        [BIN / "ace", "data", "synth", "--scale", "tiny", "--out", str(tmp_path / "world")]
        + [arg for pair in small for arg in ("-S", pair)]
        + ["-S", "synth.workers=1", "--params", str(ROOT / "params.yaml")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert len(pd.read_parquet(tmp_path / "world" / "products.parquet")) == 30
    bad = subprocess.run(
        [BIN / "ace", "data", "synth", "-S", "synth.scale=huge", "--out", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert bad.returncode == 1 and "not one of" in bad.stderr


def test_fine_tuning_loads_the_encoder_without_a_load_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    import transformers

    from components.models.modeling import AceBertForRetrieval, CeBertForPreTraining, CeBertModel
    from tests.model.test_modeling import _config

    CeBertForPreTraining(_config()).save_pretrained(tmp_path)
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            CeBertModel.from_pretrained(tmp_path)  # the pre-training heads are left behind
            assert "LOAD REPORT" not in caplog.text
            AceBertForRetrieval.from_pretrained(tmp_path)  # towers missing: still reported
            assert "LOAD REPORT" in caplog.text
    finally:
        transformers.utils.logging.disable_propagation()


def test_a_figure_is_written_whole_or_not_at_all(tmp_path: Path):
    import matplotlib.pyplot as plt

    from components.ops.plots import figure

    open_before = len(plt.get_fignums())
    with figure(tmp_path / "new" / "ok.png", 1, 2, figsize=(3, 2)) as (_, axes):
        axes[0].plot([0, 1], [0, 1])
    assert (tmp_path / "new" / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="drawing failed"), figure(tmp_path / "bad.png") as _:
        raise ValueError("drawing failed")
    assert not (tmp_path / "bad.png").exists()
    assert len(plt.get_fignums()) == open_before  # both closed
