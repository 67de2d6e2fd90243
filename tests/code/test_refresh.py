"""The daily index refresh: new products searchable without a retrain, through the gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import components.ops.gate
from components.config import AppendConfig
from components.data.clicklog import split_days
from components.data.world.append import append_days
from components.ops import tracking
from components.ops.gate import CHAMPION, gate, served_figures
from components.ops.monitor import monitor
from tests.conftest import ROOT, TRAINED_FEATURES, trained_overrides, trained_params

pytestmark = pytest.mark.usefixtures("one_thread")


def _aliases() -> dict[str, str]:
    registered = MlflowClient().get_registered_model("ace")
    return {alias: str(version) for alias, version in registered.aliases.items()}


def _versions() -> int:
    return len(MlflowClient().search_model_versions("name='ace'"))


@pytest.mark.slow
def test_refresh_makes_new_products_searchable_through_the_gate(
    trained_world: Path, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from prefect.testing.utilities import prefect_test_harness

    from flows.refresh import refresh_index

    data, artifacts = tmp_path / "data", tmp_path / "artifacts"
    shutil.copytree(tiny_world, data)
    shutil.copytree(trained_world, artifacts, ignore=shutil.ignore_patterns("gate"))
    overrides = trained_overrides(
        artifacts, data, **TRAINED_FEATURES, **{"refresh.task_retries": 0}
    )
    params = trained_params(artifacts, data, **TRAINED_FEATURES, **{"refresh.task_retries": 0})
    tracking.use_experiment(params.tracking.experiment)
    with mlflow.start_run():
        gate(params, artifacts / "gate")  # the champion knows the first 100 products only
    champion = _aliases()[CHAMPION]
    old_index = np.load(artifacts / "index" / "product_embeddings.npy")

    # A new season: new products, and searches for them on two new days.
    appended = append_days(data, AppendConfig(days=2, drift=("season",)), progress=False)
    assert appended.new_products > 0
    params_file = str(ROOT / "params.yaml")
    with prefect_test_harness():
        # A crash after the refreshed bundle is registered, before any alias moves.
        def crash(*args: object, **kwargs: object) -> None:
            raise RuntimeError("the machine went away")

        with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="went away"):
            patch.setattr(components.ops.gate, "check", crash)
            refresh_index(params_file=params_file, overrides=overrides)
        assert _aliases() == {CHAMPION: champion}  # the previous index still serves

        impressions = pd.read_parquet(artifacts / "validate" / "impressions.parquet")
        test = split_days(impressions, params.split).test
        before = served_figures(f"models:/ace@{CHAMPION}", test)
        assert before["clicks_on_products_not_indexed"] > 0

        refreshed = refresh_index(params_file=params_file, overrides=overrides)
        figures = refreshed["refresh"]
        products = pd.read_parquet(artifacts / "validate" / "products.parquet")
        assert figures["registered"] and figures["passed"]
        assert figures["products_added"] == len(products) - len(old_index)
        assert "promoted to champion" in refreshed["outcome"]
        version = _aliases()[CHAMPION]
        assert version != champion and _aliases()["previous"] == champion
        tags = MlflowClient().get_model_version("ace", version).tags
        assert tags["refreshed_from"] == champion and tags["gate"] == "passed"

        after = served_figures(f"models:/ace@{CHAMPION}", test)
        assert after["clicks_on_products_not_indexed"] == 0
        assert after["recall_at_100"] > before["recall_at_100"]
        # The products the champion knew keep their vectors, in their rows.
        grown = np.load(artifacts / "refresh" / "index" / "product_embeddings.npy")
        np.testing.assert_array_equal(grown[: len(old_index)], old_index)
        ids = json.loads((artifacts / "refresh" / "index" / "product_ids.json").read_text())
        assert sorted(ids) == sorted(products["product_id"])

        # The monitor judges the same new days, now with every product in the index.
        drift = monitor(params, artifacts / "monitor")
        first = appended.first_day
        assert drift.current_days == list(range(first, first + appended.days))
        assert drift.champion_on_new_days["clicks_on_products_not_indexed"] == 0

        # Nothing new: nothing registered, the champion stays.
        versions = _versions()
        again = refresh_index(params_file=params_file, overrides=overrides)
        assert not again["refresh"]["registered"] and "nothing new" in again["outcome"]
        assert _versions() == versions and _aliases()[CHAMPION] == version
