"""The gate and the served model: pass, fail and first-ever promotion; bad requests get 4xx."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from unittest import mock

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.config import Params, ServingLimits
from components.data.clicklog import split_days
from components.ops import tracking
from components.ops.gate import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    check,
    evaluate_served,
    gate,
    hash_test_rows,
)
from components.serving.serving import UNKNOWN_WORDS, Retriever, validate_request
from tests.conftest import ROOT, trained_params

BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
if not (BIN / "mlflow").exists():
    import sys

    BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(trained_world: Path) -> Path:
    return trained_world


def test_checks_name_what_failed():
    floors = {"gauc": 0.6, "recall_at_100": 0.3}
    good = {"gauc": 0.8, "recall_at_100": 0.5}
    assert check(good, None, floors, 0.01) == []  # first model: floors only
    assert check({"gauc": 0.5, "recall_at_100": 0.5}, None, floors, 0.01) == ["floor:gauc"]
    champion = {"gauc": 0.805, "recall_at_100": 0.6}
    assert check(good, champion, floors, 0.01) == ["regression:recall_at_100"]
    assert check(good, champion, floors, 0.2) == []
    assert check(good, None, floors, 0.01, fidelity=0.94, min_fidelity=0.95) == ["fidelity:student"]
    assert check(good, None, floors, 0.01, fidelity=0.96, min_fidelity=0.95) == []


def _run_gate(params: Params) -> dict:
    tracking.use_experiment("gate-test")
    with mlflow.start_run():
        gate(params, params.paths.artifacts_dir / "gate")
    return json.loads((params.paths.artifacts_dir / "gate" / "decision.json").read_text())


def _other_bundle(max_k: int) -> dict[str, object]:
    """Overrides that make a candidate with the same model but other serving settings: another
    bundle (so not skipped as identical) with the same figures."""
    return {"serving.limits.max_k": max_k}


def _versions(name: str = "ace") -> int:
    return len(MlflowClient().search_model_versions(f"name='{name}'"))


def test_gate_promotes_the_first_and_better_models_and_never_a_failing_one(
    world: Path, tiny_world: Path
):
    client = MlflowClient()
    name = "ace"
    first = _run_gate(trained_params(world, tiny_world))
    assert first["passed"] and first["champion_version"] is None  # first-ever model
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == first["version"]
    tags = client.get_model_version(name, first["version"]).tags
    # Judged as served (student + cache + index), so the figures are the served path's own.
    served = evaluate_served(
        Retriever(world / "distill" / "student", world / "index", 12),
        split_days(
            pd.read_parquet(world / "validate" / "impressions.parquet"),
            trained_params(world, tiny_world).split,
        ).test,
    )
    assert float(tags["gauc"]) == pytest.approx(served["gauc"], abs=1e-9)
    assert float(tags["recall_at_100"]) == pytest.approx(served["recall_at_100"], abs=1e-9)

    # The same weights, index, settings and test rows: nothing registered, nothing moved.
    same = _run_gate(trained_params(world, tiny_world))
    assert same["identical_to_champion"] and same["version"] == first["version"]
    assert _versions() == 1

    second = _run_gate(trained_params(world, tiny_world, **_other_bundle(999)))  # same test rows
    assert second["passed"] and second["champion_version"] == first["version"]
    assert not second["champion_reevaluated"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == second["version"]
    assert str(client.get_model_version_by_alias(name, PREVIOUS).version) == first["version"]

    failing = _run_gate(
        trained_params(world, tiny_world, **{"gate.min_gauc": 1.0, **_other_bundle(998)})
    )
    assert not failing["passed"] and failing["failed_checks"] == ["floor:gauc"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == second["version"]
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == failing["version"]
    version = client.get_model_version(name, failing["version"])
    assert version.tags["gate"] == "failed" and version.tags["failed_checks"] == "floor:gauc"

    unfaithful = _run_gate(
        trained_params(
            world, tiny_world, **{"gate.min_student_fidelity": 5.0, **_other_bundle(997)}
        )
    )
    assert unfaithful["failed_checks"] == ["fidelity:student"]

    # A champion better than the candidate on the same test rows: a regression, not promoted.
    client.set_model_version_tag(name, second["version"], "gauc", "0.999")
    regressed = _run_gate(trained_params(world, tiny_world, **_other_bundle(996)))
    assert regressed["failed_checks"] == ["regression:gauc"]
    assert not regressed["champion_reevaluated"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == second["version"]


def _scrambled_copy(world: Path, into: Path) -> Path:
    """The world's artifacts with the index's product ids shuffled: a candidate whose served
    path is near chance."""
    shutil.copytree(world, into, ignore=shutil.ignore_patterns("gate"))
    ids_file = into / "index" / "product_ids.json"
    ids = json.loads(ids_file.read_text())
    ids_file.write_text(json.dumps(ids[7:] + ids[:7]))
    return into


def test_a_champion_from_another_test_period_is_judged_again_on_these_rows(
    world: Path, tiny_world: Path, tmp_path: Path
):
    """Stale figures would let a worse candidate through; fresh ones, on these rows, do not."""
    client = MlflowClient()
    champion = _run_gate(trained_params(world, tiny_world))
    # What the registry would say of a champion judged on another period, with weaker figures.
    for key, value in {
        "test_rows_hash": "another-period",
        "gauc": 0.0,
        "recall_at_100": 0.0,
    }.items():
        client.set_model_version_tag("ace", champion["version"], key, str(value))
    worse = _scrambled_copy(world, tmp_path / "worse")
    decision = _run_gate(trained_params(worse, tiny_world))
    assert decision["champion_reevaluated"]
    stale = {"gauc": 0.0, "recall_at_100": 0.0}
    floors = {"gauc": 0.0, "recall_at_100": 0.0}
    assert check(decision["candidate"], stale, floors, 0.01) == []  # it would pass on stale ones
    # (Recall@100 over 100 products is 1 for any ranking: GAUC tells them apart.)
    assert not decision["passed"] and "regression:gauc" in decision["failed_checks"]
    assert str(client.get_model_version_by_alias("ace", CHAMPION).version) == champion["version"]


def test_same_rows_anywhere_are_the_same_and_other_rows_are_not(
    world: Path, tiny_world: Path, tmp_path: Path
):
    """Untracked data outside ./data: sameness comes from the test rows, not from data.dvc."""
    first = _run_gate(trained_params(world, tiny_world))
    elsewhere = tmp_path / "elsewhere" / "artifacts"
    shutil.copytree(world, elsewhere, ignore=shutil.ignore_patterns("gate"))
    impressions = pd.read_parquet(elsewhere / "validate" / "impressions.parquet")
    shuffled = impressions.sample(frac=1.0, random_state=0)  # same rows, another order
    shuffled.to_parquet(elsewhere / "validate" / "impressions.parquet", index=False)
    moved = _run_gate(trained_params(elsewhere, tmp_path / "no-data", **_other_bundle(999)))
    assert moved["champion_version"] == first["version"] and not moved["champion_reevaluated"]

    test = split_days(impressions, trained_params(world, tiny_world).split).test
    fewer = impressions.drop(index=test[test["search_id"] == test["search_id"].iloc[0]].index)
    fewer.to_parquet(elsewhere / "validate" / "impressions.parquet", index=False)
    changed = _run_gate(trained_params(elsewhere, tmp_path / "no-data", **_other_bundle(998)))
    assert changed["champion_reevaluated"]
    assert hash_test_rows(test) != hash_test_rows(
        split_days(fewer, trained_params(world, tiny_world).split).test
    )
    assert hash_test_rows(test) == hash_test_rows(test.sample(frac=1.0, random_state=1))


def test_a_served_model_is_charged_for_clicks_on_products_its_index_lacks(
    world: Path, tiny_world: Path
):
    params = trained_params(world, tiny_world)
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


@pytest.fixture(scope="module")
def champion(world: Path, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    """(tracking store, the bundle's local folder) of one champion with small limits, registered
    once for the serving tests in a store of its own."""
    home = tmp_path_factory.mktemp("champion")
    store = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": store}):
        _run_gate(trained_params(world, tiny_world, **{"serving.limits.max_rows_per_request": 50}))
        bundle = Path(mlflow.artifacts.download_artifacts("models:/ace@champion"))
    return store, bundle


def test_served_model_answers_and_refuses_bad_requests(champion: tuple[str, Path]):
    _, bundle = champion
    assert not list(bundle.rglob("*.pkl"))  # models from code: nothing to unpickle
    model = mlflow.pyfunc.load_model(str(bundle))
    answer = model.predict(pd.DataFrame({"query": ["red dress", "blue cap"], "k": [5, 3]}))
    assert [len(ids) for ids in answer["product_ids"]] == [5, 3]
    assert all(s[0] >= s[-1] for s in answer["scores"])  # best first
    assert answer["warning"].isna().all()
    default = model.predict(pd.DataFrame({"query": ["red dress"]}))
    assert len(default["product_ids"][0]) == 10
    # k is optional per row: a row without it gets the default.
    mixed = model.predict(pd.DataFrame({"query": ["red dress", "blue cap"], "k": [4, None]}))
    assert [len(ids) for ids in mixed["product_ids"]] == [4, 10]

    for frame, message in (
        (pd.DataFrame({"q": ["red"]}), "no rows with a 'query'"),  # MLflow drops 'q'
        (pd.DataFrame({"q": ["red"], "k": [3]}), "missing field 'query'"),
        (pd.DataFrame({"query": ["   "]}), "row 0: 'query' is empty"),
        (pd.DataFrame({"query": ["x" * 300]}), "row 0: 'query' has 300 characters, at most 256"),
        (pd.DataFrame({"query": ["red\ud800"]}), "row 0: 'query' is not valid Unicode text"),
        (pd.DataFrame({"query": ["red"], "k": [0]}), "row 0: 'k' must be between 1 and 100"),
        (pd.DataFrame({"query": ["red"], "k": [10**6]}), "between 1 and 100, got 1000000"),
        (pd.DataFrame({"query": ["a", "b"], "k": [3, 10.5]}), "row 1: 'k' must be a whole number"),
        (pd.DataFrame({"query": ["red"], "k": ["10"]}), "row 0: 'k' must be a whole number"),
        (pd.DataFrame({"query": ["red"], "k": [True]}), "row 0: 'k' must be a whole number"),
        (pd.DataFrame({"query": ["red"] * 51}), "51 queries in one request, at most 50"),
    ):
        with pytest.raises(MlflowException, match=re.escape(message)) as caught:
            model.predict(frame)
        assert caught.value.get_http_status_code() == 400
        assert "\n" not in caught.value.message

    limits = ServingLimits(max_k=50)
    assert validate_request({"query": ["a"], "k": [10.0]}, limits, 100) == (["a"], [10])
    with pytest.raises(MlflowException, match="between 1 and 20"):  # the catalogue caps k
        validate_request(pd.DataFrame({"query": ["red"], "k": [30]}), limits, 20)
    with pytest.raises(MlflowException, match="'query' must be a string, got int"):
        validate_request(pd.DataFrame({"query": [3]}), limits, 100)
    with pytest.raises(MlflowException, match="expected rows with a 'query' field"):
        validate_request([["red"]], limits, 100)
    assert validate_request([{"query": "a", "k": 2}, {"query": "b"}], limits, 100) == (
        ["a", "b"],
        [2, 10],
    )


def test_a_query_of_only_unknown_words_returns_nothing_and_says_why(world: Path, tiny_world: Path):
    retriever = Retriever(world / "distill" / "student", world / "index", 12)
    found = retriever.search(["👗🔥", "红色连衣裙", "red dress 👗"], [5, 5, 5])
    assert found["product_ids"].tolist()[:2] == [[], []]
    assert found["warning"].tolist()[:2] == [UNKNOWN_WORDS] * 2
    assert len(found["product_ids"][2]) == 5 and found["warning"][2] is None  # one known word


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(champion: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """`ace serve` of the champion, started once for the HTTP tests; its port."""
    store, _ = champion
    log = tmp_path_factory.mktemp("served") / "server.log"
    port = _free_port()
    # The server starts uvicorn by name: the venv must be on PATH, as it is once activated.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": path}
    server = subprocess.Popen(
        [BIN / "ace", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "the server did not start"
                time.sleep(1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def _post(port: int, body: bytes | None, content_type: str | None = "application/json"):
    """(status, JSON body) of POST /invocations, sent exactly as given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": content_type} if content_type else {}
    connection.request("POST", "/invocations", body=body, headers=headers)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, json.loads(payload)


def _records(*rows: dict) -> bytes:
    return json.dumps({"dataframe_records": list(rows)}).encode()


HOSTILE_REQUESTS = [
    # (case, body, content type, status, what the one-line message says)
    ("k as a string", _records({"query": "red", "k": "10"}), "application/json", 400, "whole"),
    ("k as a fraction", _records({"query": "red", "k": 10.5}), "application/json", 400, "whole"),
    ("k as a bool", _records({"query": "red", "k": True}), "application/json", 400, "whole"),
    ("k of 0", _records({"query": "red", "k": 0}), "application/json", 400, "between 1 and"),
    ("k over max_k", _records({"query": "red", "k": 5000}), "application/json", 400, "between"),
    ("empty query", _records({"query": "", "k": 4}), "application/json", 400, "empty"),
    ("no query", _records({"k": 4}), "application/json", 400, "query"),
    ("query a number", _records({"query": 5}), "application/json", 400, "must be a string"),
    (
        "lone surrogate",
        b'{"dataframe_records": [{"query": "\\ud800"}]}',
        "application/json",
        400,
        "Unicode",
    ),
    ("no rows", _records(), "application/json", 400, "no rows with a 'query'"),
    ("wrong shape", json.dumps({"something": "else"}).encode(), "application/json", 400, ""),
    ("not JSON", b"{not json", "application/json", 400, "JSON"),
    ("a JSON list", b"[1, 2]", "application/json", 400, ""),
    ("invalid UTF-8", b'{"dataframe_records": [{"query": "\xff"}]}', "application/json", 400, ""),
    ("empty body, no content type", b"", None, 415, "Content-Type"),
    ("body, no content type", _records({"query": "red"}), None, 415, "Content-Type"),
    ("empty body", b"", "application/json", 400, "empty request body"),
    ("text/plain", b"red dress", "text/plain", 415, ""),
    ("bad CSV", b'query,k\n"red,3\n', "text/csv", 400, ""),
    ("not Parquet", b"PAR1 nonsense", "application/vnd.apache.parquet", 400, ""),
    (
        "over max_request_bytes",
        _records(*[{"query": "red dress"}] * 60_000),
        "application/json",
        413,
        "1048576 bytes",
    ),
    (
        "over max_rows_per_request",
        _records(*[{"query": "red"}] * 51),
        "application/json",
        400,
        "at most 50",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [pytest.param(*case[1:], id=case[0]) for case in HOSTILE_REQUESTS],
)
def test_ace_serve_answers_hostile_requests_with_one_line_4xx(
    served, body, content_type, status, says
):
    port = served
    got, payload = _post(port, body, content_type)
    assert got == status, payload
    assert set(payload) == {"error_code", "message"} and "\n" not in payload["message"]
    assert says in payload["message"]
    assert "Traceback" not in payload["message"] and 'File "' not in payload["message"]


@pytest.mark.slow
def test_ace_serve_answers_the_champion_and_refuses_10000_rows_at_once(served):
    port = served
    status, body = _post(port, _records({"query": "red dress", "k": 4}, {"query": "blue cap"}))
    assert status == 200, body
    rows = body["predictions"]
    assert [len(r["product_ids"]) for r in rows] == [4, 10] and rows[0]["warning"] is None
    status, body = _post(port, _records({"query": "👗"}))
    assert status == 200 and body["predictions"][0]["product_ids"] == []
    assert body["predictions"][0]["warning"] == UNKNOWN_WORDS
    # 10,000 queries: refused whole, naming the limit, before any is searched.
    status, body = _post(port, _records(*[{"query": "red dress", "k": 10}] * 10_000))
    assert (status, body["message"]) == (
        400,
        "10000 queries in one request, at most 50 (serving.limits.max_rows_per_request): split it",
    )
    status, _ = _post(port, _records({"query": "red dress"}))
    assert status == 200  # and the server is free for the next request


def test_search_prints_titles_and_draws_a_contact_sheet(
    world: Path, tiny_world: Path, tmp_path: Path
):
    from components.errors import AceError
    from components.serving.search import contact_sheet, search_titles

    params = trained_params(world, tiny_world)
    _run_gate(params)
    results, warning = search_titles(params, "models:/ace@champion", "red dress", 5)
    assert warning is None
    products = pd.read_parquet(world / "validate" / "products.parquet").set_index("product_id")
    assert len(results) == 5 and list(results.score) == sorted(results.score, reverse=True)
    assert list(results.title) == [products.at[i, "title"] for i in results.product_id]
    contact_sheet(params, results, "red dress", tmp_path / "sheet.png")
    assert (tmp_path / "sheet.png").stat().st_size > 5000
    nothing, warning = search_titles(params, "models:/ace@champion", "红色 👗", 5)
    assert nothing.empty and warning == UNKNOWN_WORDS
    with pytest.raises(AceError, match="between 1 and"):
        search_titles(params, "models:/ace@champion", "red dress", 0)
    with pytest.raises(AceError, match="no such model"):
        search_titles(params, "models:/nothing@champion", "red dress", 5)
