"""New days (with and without drift), the drift report, and the retrain flow's every branch."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from components.config import AppendConfig, ConfigError, load_params
from components.data.world import generate_world
from components.data.world.append import append_days
from components.ops.monitor import SEARCH_REPORT, SUMMARY, ctr_by_position, oov_rate
from tests.conftest import ROOT, TINY_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def world(tiny_world: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_world, tmp_path / "data")
    return tmp_path / "data"


def test_append_keeps_every_old_row_and_draws_drifted_days(world: Path):
    before = pd.read_parquet(world / "impressions.parquet")
    products_before = pd.read_parquet(world / "products.parquet")
    drift = AppendConfig(days=2, drift=("new_category", "season", "clicks"))
    summary = append_days(world, drift, progress=False)

    after = pd.read_parquet(world / "impressions.parquet")
    products = pd.read_parquet(world / "products.parquet")
    pd.testing.assert_frame_equal(after.iloc[: len(before)], before)
    pd.testing.assert_frame_equal(products.iloc[: len(products_before)], products_before)
    new_days = after.iloc[len(before) :]
    assert sorted(new_days["day"].unique()) == [4, 5] and summary.first_day == 4
    assert not set(new_days["search_id"]) & set(before["search_id"])

    added = products.iloc[len(products_before) :]
    assert len(added) == summary.new_products == 80  # 10% of 400, twice (category + season)
    assert products["product_id"].is_unique
    assert all((world / path).is_file() for path in added["image_path"])
    assert (added["category"].iloc[:40] == "table").all()  # the new category's, then season's
    queries = pd.read_parquet(world / "truth" / "queries.parquet")
    assert summary.new_queries > 0 and (queries["category"] == "table").sum() == summary.new_queries
    assert queries["popularity"].sum() == pytest.approx(1.0)
    # shoppers click further up the list than before
    ctr_old, ctr_new = ctr_by_position(before), ctr_by_position(new_days)
    assert ctr_new[3] < 0.6 * ctr_old[3]
    manifest = json.loads((world / "world.json").read_text())
    assert manifest["days"] == 6 and manifest["test_days"] == [5]
    assert manifest["appended"][0]["drift"] == ["new_category", "season", "clicks"]

    # The change persists: a later undrifted append keeps the new category and behaviour.
    again = append_days(world, AppendConfig(days=1), progress=False)
    latest = pd.read_parquet(world / "impressions.parquet").query("day == 6")
    assert again.new_products == 0
    assert latest["product_id"].isin(added["product_id"]).any()
    with pytest.raises(ConfigError, match="does not sell yet"):
        append_days(world, AppendConfig(days=1, drift=("new_category",)), progress=False)


def test_append_is_deterministic_by_seed(world: Path, tmp_path: Path):
    twin = tmp_path / "twin"
    shutil.copytree(world, twin)
    for data in (world, twin):
        append_days(data, AppendConfig(days=1, drift=("query_mix",), seed=5), progress=False)
    for table in ("impressions.parquet", "truth/queries.parquet"):
        assert (world / table).read_bytes() == (twin / table).read_bytes()
    other = tmp_path / "other"
    shutil.copytree(twin, other)
    shutil.copy(world / "impressions.parquet", other / "impressions.parquet")
    append_days(other, AppendConfig(days=1, drift=("query_mix",), seed=6), progress=False)
    assert (other / "impressions.parquet").read_bytes() != (
        world / "impressions.parquet"
    ).read_bytes()


def test_out_of_vocabulary_rate_counts_words_that_are_not_whole_tokens():
    rates = oov_rate(pd.Series(["red dress", "red drezz", "Desk"]), {"red", "dress"})
    assert np.allclose(rates, [0.0, 0.5, 1.0])


def _overrides(base: Path, **extra: object) -> dict[str, object]:
    return {
        **TINY_OVERRIDES,
        # More searches than the tiny default, so a same-distribution week sits well inside
        # the drift thresholds (category mix over ~24 categories needs a few thousand clicks).
        "synth.scales.tiny.searches_per_day": 1000,
        "paths.data_dir": str(base / "data"),
        "paths.artifacts_dir": str(base / "artifacts"),
        "gate.min_gauc": 0.0,
        "gate.min_recall_at_100": 0.0,
        "gate.min_student_fidelity": 0.0,
        "retrain.task_retries": 0,
        # The tiny champion is near chance (Recall@100 ~0.3 with 25% of the catalogue in the top
        # 100): its Recall@100 moves by ~0.05 between two same-distribution days (measured), so
        # decay alone cannot tell a tiny quiet week from a drifted one; the inputs must.
        "monitor.decay_tolerance": 0.1,
        **extra,
    }


def _aliases(name: str = "ace") -> dict[str, str]:
    registered = MlflowClient().get_registered_model(name)
    return {alias: str(version) for alias, version in registered.aliases.items()}


def _versions(name: str = "ace") -> int:
    return len(MlflowClient().search_model_versions(f"name='{name}'"))


@pytest.mark.slow
def test_retrain_takes_each_branch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from prefect.testing.utilities import prefect_test_harness

    import components.training.finetune
    from flows.ace import ace
    from flows.retrain import retrain

    params_file = str(ROOT / "params.yaml")
    overrides = _overrides(tmp_path)
    params = load_params(params_file, overrides)
    data, artifacts = params.paths.data_dir, params.paths.artifacts_dir
    generate_world(params.synth, data, progress=False)
    with prefect_test_harness():
        ace(params_file=params_file, overrides=overrides)
        assert _aliases() == {"champion": "1"}

        # A week like the old ones (another seed): the report, no drift, no retraining.
        append_days(data, AppendConfig(days=3, seed=99), progress=False)
        quiet = retrain(params_file=params_file, overrides=overrides)
        assert quiet["decision"] == "no drift", quiet["outcome"]
        report = json.loads((artifacts / "monitor" / SUMMARY).read_text())
        assert not report["drifted"] and report["current_days"] == [4, 5, 6]
        assert (artifacts / "monitor" / SEARCH_REPORT).stat().st_size > 10_000
        assert "pretrain" not in quiet and _versions() == 1

        # A drifted week, and a crash mid-retrain: the registry and the index stay as they were.
        append_days(data, AppendConfig(days=3, drift=("query_mix", "clicks")), progress=False)
        index_before = (artifacts / "index" / "products.faiss").read_bytes()

        def crash(*args: object, **kwargs: object) -> None:
            raise RuntimeError("the machine went away")

        with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="went away"):
            patch.setattr(components.training.finetune, "finetune", crash)
            retrain(params_file=params_file, overrides=overrides)
        assert _aliases() == {"champion": "1"} and _versions() == 1
        assert (artifacts / "index" / "products.faiss").read_bytes() == index_before

        # Drift, and a gate the candidate cannot pass: registered as challenger only.
        strict = {**overrides, "gate.min_gauc": 0.99}
        refused = retrain(params_file=params_file, overrides=strict)
        assert refused["decision"] == "refused" and refused["monitor"]["drifted"]
        assert _aliases() == {"champion": "1", "challenger": "2"}
        # The same attempt again (same data, champion, params, code) does not run twice.
        repeated = retrain(params_file=params_file, overrides=strict)
        assert repeated["decision"] == "done before" and _versions() == 2

        # Drift and a gate it passes: promoted, the old champion kept as `previous`.
        promoted = retrain(params_file=params_file, overrides=overrides)
        assert promoted["decision"] == "promoted"
        assert _aliases() == {"champion": "3", "previous": "1", "challenger": "2"}

        # The new champion has seen every day: nothing new to judge.
        settled = retrain(params_file=params_file, overrides=overrides)
        assert settled["decision"] == "no drift" and "no new days" in settled["outcome"]


def test_retrain_deployment_runs_on_the_schedule_in_params():
    """The deployment carries the cron from params, and a real Prefect server's scheduler turns
    it into scheduled runs (it did not with SQLAlchemy 2.1: see pyproject.toml)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.server import models
    from prefect.server.database import provide_database_interface
    from prefect.testing.utilities import prefect_test_harness

    from flows.serve import deployments

    offered = {d.name: d for d in deployments(str(ROOT / "params.yaml"))}
    assert set(offered) == {"full", "retrain", "refresh"}
    assert {d.flow_name for d in offered.values()} == {"ace"}
    params = load_params(ROOT / "params.yaml")
    for name, cfg in (("retrain", params.retrain), ("refresh", params.refresh)):
        schedules = offered[name].schedules
        assert len(schedules) == 1 and schedules[0].schedule.cron == cfg.cron
        assert offered[name].concurrency_limit == 1
    assert not offered["full"].schedules

    async def schedule(name: str) -> list:
        deployment_id = await offered[name].apply()
        db = provide_database_interface()
        async with db.session_context(begin_transaction=True) as session:
            await models.deployments.schedule_runs(session, deployment_id=deployment_id)
        async with get_client() as client:
            runs = await client.read_flow_runs()
        return [r for r in runs if r.deployment_id == deployment_id]

    with prefect_test_harness():
        weekly, daily = asyncio.run(schedule("retrain")), asyncio.run(schedule("refresh"))
    for runs in (weekly, daily):
        assert runs and {r.state_name for r in runs} == {"Scheduled"}
    starts = sorted(r.expected_start_time for r in weekly)
    assert all(t.weekday() == 0 and (t.hour, t.minute) == (3, 0) for t in starts)  # Mon 03:00
    assert all((b - a).days == 7 for a, b in itertools.pairwise(starts))
    starts = sorted(r.expected_start_time for r in daily)
    assert all((t.hour, t.minute) == (2, 0) for t in starts)  # every day at 02:00
    assert all((b - a).days == 1 for a, b in itertools.pairwise(starts))


def test_cli_appends_days_and_monitor_needs_a_champion(world: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'cli.db'}",
    }
    data = ["--params", str(ROOT / "params.yaml"), "-S", f"paths.data_dir={world}"]
    appended = subprocess.run(
        [bin_dir / "ace", "data", "append", "--days", "1", "--drift", "clicks", "--no-dvc", *data],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert appended.returncode == 0, appended.stderr
    assert "appended days 4-4 (drift: clicks)" in appended.stdout
    assert pd.read_parquet(world / "impressions.parquet")["day"].max() == 4
    monitored = subprocess.run(
        [bin_dir / "ace", "monitor", *data], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert monitored.returncode == 1
    assert monitored.stderr.strip().splitlines() == [
        "error: no `champion` of registered model 'ace' to monitor: run the pipeline first"
    ]


def test_recording_a_data_version_without_dvc_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`ace data append` on DVC-tracked data, with no dvc beside ace nor on PATH: one line."""
    from components.cli import _record_data_version
    from components.errors import AceError

    (tmp_path / "data").mkdir()
    (tmp_path / "data.dvc").write_text("outs: []\n")
    monkeypatch.setattr("sys.executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(AceError, match=r"data\.dvc: .* no `dvc` command was found"):
        _record_data_version(tmp_path / "data")
