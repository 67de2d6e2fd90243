"""`ace compare`: aggregation of evaluate runs over seeds, per variant, from a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from components.errors import AceError
from components.ops import tracking
from components.ops.compare import METRICS, compare, plot_adversarial_curves, write


def _log(stage: str, variant: str, seed: int, metrics: dict[str, float], version: str = "v1"):
    with mlflow.start_run(run_name=stage):
        mlflow.set_tags({"stage": stage, "data_version": version})
        if stage == "baselines":
            mlflow.log_params({"baselines.seed": seed})
        else:
            mlflow.log_params({"model.variant": variant, "finetune.seed": seed})
        mlflow.log_metrics(metrics)


def _metrics(value: float, prefix: str = "") -> dict[str, float]:
    return {
        **{f"{prefix}{m}": value for m in METRICS},
        **{f"val_{prefix}{m}": value / 2 for m in METRICS},
        f"{prefix}image_recall_at_100": value / 4,
    }


def test_compare_aggregates_seeds_keeps_the_newest_run_and_filters_data_versions(tmp_path: Path):
    tracking.use_experiment("cmp")
    _log("evaluate", "cebert", 1, _metrics(0.9))  # superseded by the re-run below
    for seed, value in ((1, 0.5), (2, 0.6), (3, 0.7)):
        _log("evaluate", "cebert", seed, _metrics(value))
    _log("evaluate", "twinbert", 1, _metrics(0.3))
    _log("evaluate", "twinbert", 1, _metrics(0.99), version="v0")  # another world
    _log("finetune", "cebert", 1, {"gauc": 0.0})  # not an evaluate run
    baselines = {**_metrics(0.1, "bm25_"), **_metrics(0.4, "st_finetuned_")}
    _log("baselines", "", 1, baselines)
    _log("baselines", "", 2, {**baselines, "st_finetuned_gauc": 0.6})

    result = compare("cmp", "v1")
    table = result.table
    assert list(table.index) == ["bm25", "st_finetuned", "twinbert", "cebert"]  # baselines first
    assert table.loc["cebert", "seeds"] == 3 and result.superseded == 1
    assert table.loc["cebert", "gauc_mean"] == pytest.approx(0.6)
    assert table.loc["cebert", "gauc_std"] == pytest.approx(np.std([0.5, 0.6, 0.7], ddof=1))
    assert table.loc["cebert", "image_recall_at_100_mean"] == pytest.approx(0.15)
    assert table.loc["twinbert", "recall_at_100_mean"] == pytest.approx(0.3)
    assert table.loc["st_finetuned", "seeds"] == 2
    assert table.loc["st_finetuned", "gauc_mean"] == pytest.approx(0.5)
    assert table.loc["bm25", "gauc_mean"] == pytest.approx(0.1)
    markdown = result.markdown()
    assert "| cebert | 3 | 0.6000 ± 0.1000 |" in markdown
    assert "| twinbert | 1 | 0.3000 |" in markdown  # one seed: no spread to show
    assert "image_recall_at_100" in result.report() and "1 older re-runs" in result.report()
    # Validation figures are another period of the same runs.
    assert compare("cmp", "v1", "val").table.loc["cebert", "gauc_mean"] == pytest.approx(0.3)

    md, js = write(result, tmp_path)
    assert json.loads(js.read_text())["cebert"]["gauc_mean"] == pytest.approx(0.6)
    assert "| model | seeds |" in md.read_text()
    assert compare("cmp", None).table.loc["twinbert", "seeds"] == 1  # newest of both versions
    with pytest.raises(AceError, match="no evaluate runs"):
        compare("cmp", "v9")


def test_adversarial_curve_plot_needs_both_sides_of_a_pair(tmp_path: Path):
    tracking.use_experiment("cmp-curves")
    for variant in ("cebert_hot", "acebert"):
        with mlflow.start_run(run_name="finetune"):
            mlflow.set_tags({"stage": "finetune", "data_version": "v1"})
            mlflow.log_params({"model.variant": variant, "finetune.seed": 1})
            for step in range(1, 30):
                mlflow.log_metric("train/main_loss", 3.0 / step, step=step)
    assert plot_adversarial_curves("cmp-curves", "v1", tmp_path / "fig6.png")
    assert (tmp_path / "fig6.png").stat().st_size > 1000
    assert not plot_adversarial_curves("cmp-curves", "v2", tmp_path / "none.png")
