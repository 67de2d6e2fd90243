"""The gate and the served model: pass, fail and first-ever promotion; bad requests get 4xx."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import tracking
from components.config import FeaturesConfig, Params, load_params
from components.distill import distill
from components.evaluate import evaluate_retriever
from components.features import build_features
from components.finetune import finetune
from components.gate import CHALLENGER, CHAMPION, PREVIOUS, check, evaluate_served, gate
from components.index import build as build_index
from components.pretrain import pretrain
from components.retrieval import split_days
from components.serving import Retriever, validate_request
from tests.conftest import ROOT, TINY_OVERRIDES

BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
if not (BIN / "mlflow").exists():
    import sys

    BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(artifacts: Path, tiny_world: Path, **overrides: object) -> Params:
    return load_params(
        ROOT / "params.yaml",
        {
            **TINY_OVERRIDES,
            "paths.data_dir": str(tiny_world),
            "paths.artifacts_dir": str(artifacts),
            "model.variant": "cebert",
            "pretrain.num_layers": 2,
            "pretrain.device": "cpu",
            "finetune.device": "cpu",
            "evaluate.device": "cpu",
            "distill.device": "cpu",
            "gate.min_gauc": 0.0,
            "gate.min_recall_at_100": 0.0,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """validate -> features -> pretrain -> finetune -> evaluate -> distill -> index, tiny."""
    artifacts = tmp_path_factory.mktemp("gate_artifacts")
    products = pd.read_parquet(tiny_world / "products.parquet").head(100)
    impressions = pd.read_parquet(tiny_world / "impressions.parquet")
    impressions = impressions[impressions.product_id.isin(products.product_id)]
    (artifacts / "validate").mkdir()
    products.to_parquet(artifacts / "validate" / "products.parquet", index=False)
    impressions.to_parquet(artifacts / "validate" / "impressions.parquet", index=False)
    cfg = FeaturesConfig(patch_input=32, variants=("roi",), samples_logged=0, device="cpu")
    build_features(products, tiny_world, artifacts / "features", cfg, progress=False)
    params = _params(artifacts, tiny_world)
    pretrain(params, artifacts / "pretrain", progress=False)
    finetune(params, artifacts / "finetune", progress=False)
    evaluate_retriever(params, artifacts / "evaluate", progress=False)
    distill(params, artifacts / "distill", progress=False)
    build_index(params, artifacts / "index", progress=False)
    return artifacts


def test_checks_name_what_failed():
    floors = {"gauc": 0.6, "recall_at_100": 0.3}
    good = {"gauc": 0.8, "recall_at_100": 0.5}
    assert check(good, None, floors, 0.01) == []  # first model: floors only
    assert check({"gauc": 0.5, "recall_at_100": 0.5}, None, floors, 0.01) == ["floor:gauc"]
    champion = {"gauc": 0.805, "recall_at_100": 0.6}
    assert check(good, champion, floors, 0.01) == ["regression:recall_at_100"]
    assert check(good, champion, floors, 0.2) == []


def _run_gate(params: Params) -> dict:
    tracking.use_experiment("gate-test")
    with mlflow.start_run():
        gate(params, params.paths.artifacts_dir / "gate")
    return json.loads((params.paths.artifacts_dir / "gate" / "decision.json").read_text())


def test_gate_promotes_the_first_and_better_models_and_never_a_failing_one(
    world: Path, tiny_world: Path
):
    client = MlflowClient()
    name = "ace"
    first = _run_gate(_params(world, tiny_world))
    assert first["passed"] and first["champion_version"] is None  # first-ever model
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first["version"]

    second = _run_gate(_params(world, tiny_world))  # same figures, same data: no regression
    assert second["passed"] and second["champion_version"] == first["version"]
    assert not second["champion_reevaluated"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == second["version"]
    assert str(client.get_model_version_by_alias(name, PREVIOUS).version) == first["version"]

    failing = _run_gate(_params(world, tiny_world, **{"gate.min_gauc": 1.0}))
    assert not failing["passed"] and failing["failed_checks"] == ["floor:gauc"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == second["version"]
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == failing["version"]
    version = client.get_model_version(name, failing["version"])
    assert version.tags["gate"] == "failed" and version.tags["failed_checks"] == "floor:gauc"

    # A champion better than the candidate on the same data: a regression, not promoted.
    client.set_model_version_tag(name, second["version"], "gauc", "0.999")
    regressed = _run_gate(_params(world, tiny_world))
    assert regressed["failed_checks"] == ["regression:gauc"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == second["version"]

    # A champion from another data version is re-evaluated on this test data, as it serves.
    client.set_model_version_tag(name, second["version"], "data_version", "older-world")
    again = _run_gate(_params(world, tiny_world))
    assert again["champion_reevaluated"]
    assert 0 <= again["champion"]["recall_at_100"] <= 1 and 0 <= again["champion"]["gauc"] <= 1


def test_a_served_model_is_charged_for_clicks_on_products_its_index_lacks(
    world: Path, tiny_world: Path
):
    params = _params(world, tiny_world)
    retriever = Retriever(world / "distill" / "student", world / "index", 12)
    impressions = pd.read_parquet(world / "validate" / "impressions.parquet")
    test = split_days(impressions, params.split).test
    known = evaluate_served(retriever, test)
    assert known["clicks_on_products_not_indexed"] == 0
    clicked = test.loc[test["clicked"] == 1, "product_id"].unique()
    renamed = test.assign(  # half the clicked products are new to the index
        product_id=test["product_id"].where(~test["product_id"].isin(clicked[::2]), "p_new")
    )
    charged = evaluate_served(retriever, renamed)
    assert charged["clicks_on_products_not_indexed"] > 0.2
    assert charged["recall_at_100"] < known["recall_at_100"]
    assert charged["gauc"] < known["gauc"]


def test_served_model_answers_and_refuses_bad_requests(world: Path, tiny_world: Path):
    decision = _run_gate(_params(world, tiny_world))
    model = mlflow.pyfunc.load_model(f"models:/ace/{decision['version']}")
    answer = model.predict(pd.DataFrame({"query": ["red dress", "blue cap"], "k": [5, 3]}))
    assert [len(ids) for ids in answer["product_ids"]] == [5, 3]
    assert all(s[0] >= s[-1] for s in answer["scores"])  # best first
    default = model.predict(pd.DataFrame({"query": ["red dress"]}))
    assert len(default["product_ids"][0]) == 10

    for frame, message in (
        (pd.DataFrame({"q": ["red"]}), "query"),
        (pd.DataFrame({"query": ["   "]}), "empty"),
        (pd.DataFrame({"query": ["x" * 300]}), "characters"),
        (pd.DataFrame({"query": ["red"], "k": [0]}), "between"),
        (pd.DataFrame({"query": ["red"], "k": [10**6]}), "between"),
    ):
        with pytest.raises(MlflowException, match=message):
            model.predict(frame)
    with pytest.raises(MlflowException, match="integer"):
        validate_request(pd.DataFrame({"query": ["red"], "k": ["ten"]}), 100)
    with pytest.raises(MlflowException, match="string"):
        validate_request(pd.DataFrame({"query": [3]}), 100)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_champion_over_http(
    world: Path, tiny_world: Path, mlflow_store: str, tmp_path: Path
):
    _run_gate(_params(world, tiny_world))
    port = _free_port()
    # mlflow starts uvicorn by name: the venv must be on PATH, as it is once activated.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PATH": path}
    server = subprocess.Popen(
        [
            BIN / "mlflow",
            "models",
            "serve",
            "-m",
            "models:/ace@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("w"),
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
        status, body = _post(port, {"dataframe_records": [{"query": "red dress", "k": 4}]})
        assert status == 200, body
        assert len(body["predictions"][0]["product_ids"]) == 4
        for bad in (
            {"dataframe_records": [{"query": "", "k": 4}]},
            {"dataframe_records": [{"query": "red", "k": 0}]},
            {"dataframe_records": [{"k": 4}]},
            {"dataframe_records": [{"query": 5}]},
            {"dataframe_records": [{"query": "red", "k": "x"}]},
            {"something": "else"},
        ):
            status, body = _post(port, bad)
            assert 400 <= status < 500, (bad, status, body)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_search_prints_titles_and_draws_a_contact_sheet(
    world: Path, tiny_world: Path, tmp_path: Path
):
    from components.errors import AceError
    from components.search import contact_sheet, search_titles

    params = _params(world, tiny_world)
    _run_gate(params)
    results = search_titles(params, "models:/ace@champion", "red dress", 5)
    products = pd.read_parquet(world / "validate" / "products.parquet").set_index("product_id")
    assert len(results) == 5 and list(results.score) == sorted(results.score, reverse=True)
    assert list(results.title) == [products.at[i, "title"] for i in results.product_id]
    contact_sheet(params, results, "red dress", tmp_path / "sheet.png")
    assert (tmp_path / "sheet.png").stat().st_size > 5000
    with pytest.raises(AceError, match="between 1 and"):
        search_titles(params, "models:/ace@champion", "red dress", 0)
    with pytest.raises(AceError, match="no such model"):
        search_titles(params, "models:/nothing@champion", "red dress", 5)
