"""`ace compare`: aggregation of evaluate runs over seeds, per variant, from a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from components import tracking
from components.compare import METRICS, compare, plot_adversarial_curves, write
from components.errors import AceError


def _log(stage: str, variant: str, seed: int, metrics: dict[str, float], version: str = "v1"):
    with mlflow.start_run(run_name=stage):
        mlflow.set_tags({"stage": stage, "data_version": version})
        mlflow.log_params({"model.variant": variant, "finetune.seed": seed})
        mlflow.log_metrics(metrics)


def _metrics(value: float) -> dict[str, float]:
    return {**{m: value for m in METRICS}, **{f"bm25_{m}": 0.1 for m in METRICS}}


def test_compare_aggregates_seeds_keeps_the_newest_run_and_filters_data_versions(tmp_path: Path):
    tracking.use_experiment("cmp")
    _log("evaluate", "cebert", 1, _metrics(0.9))  # superseded by the re-run below
    for seed, value in ((1, 0.5), (2, 0.6), (3, 0.7)):
        _log("evaluate", "cebert", seed, _metrics(value))
    _log("evaluate", "twinbert", 1, _metrics(0.3))
    _log("evaluate", "twinbert", 1, _metrics(0.99), version="v0")  # another world
    _log("finetune", "cebert", 1, {"gauc": 0.0})  # not an evaluate run

    result = compare("cmp", "v1")
    table = result.table
    assert list(table.index) == ["bm25", "twinbert", "cebert"]
    assert table.loc["cebert", "seeds"] == 3
    assert table.loc["cebert", "gauc_mean"] == pytest.approx(0.6)
    assert table.loc["cebert", "gauc_std"] == pytest.approx(np.std([0.5, 0.6, 0.7], ddof=1))
    assert table.loc["twinbert", "recall_at_100_mean"] == pytest.approx(0.3)
    assert table.loc["twinbert", "recall_at_100_std"] == 0.0
    assert table.loc["bm25", "gauc_mean"] == pytest.approx(0.1)
    assert "| cebert | 3 | 0.6000 ± 0.1000 |" in result.markdown()

    md, js = write(result, tmp_path)
    assert json.loads(js.read_text())["cebert"]["gauc_mean"] == pytest.approx(0.6)
    assert md.read_text().startswith("| variant | seeds |")
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
