"""Batch search (`ace search --file`): the same answers as one query at a time, split into
requests the served model accepts; every bad file is one error line naming the file and line."""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from components.errors import AceError
from components.serving.search import RESULT_SCHEMA, search_file
from components.serving.serving import UNKNOWN_WORDS
from tests.code import test_gate
from tests.code.test_gate import BIN
from tests.conftest import ROOT, trained_params

# test_gate's module fixtures, used here by name: a tiny model trained, and registered as the
# champion (max_rows_per_request 50) in a store of its own, once for this module.
world = test_gate.world
champion = test_gate.champion

pytestmark = pytest.mark.usefixtures("one_thread")

N = 120  # queries per file: more than the champion's max_rows_per_request of 50


@pytest.fixture(scope="module")
def queries(tiny_world: Path) -> list[str]:
    """N distinct queries of the tiny world, and one of words no model knows (a warning)."""
    found = pd.read_parquet(tiny_world / "impressions.parquet", columns=["query"])["query"]
    distinct = sorted(set(found.astype(str).str.strip()) - {""})
    assert len(distinct) >= N
    return [*distinct[: N - 1], "👗🔥"]


@pytest.fixture(scope="module")
def one_at_a_time(champion: tuple[str, Path], queries: list[str]):
    """A function (query, k) -> the served model's answer for that query alone."""
    model = mlflow.pyfunc.load_model(str(champion[1]))
    answers: dict[tuple[str, int], pd.Series] = {}

    def answer(query: str, k: int) -> pd.Series:
        if (query, k) not in answers:
            answers[(query, k)] = model.predict(pd.DataFrame({"query": [query], "k": [k]})).iloc[0]
        return answers[(query, k)]

    return answer


def _write(path: Path, queries: list[str], ks: list[int | None]) -> list[int]:
    """The file in its format; each query's place (line, or row for Parquet)."""
    if path.suffix == ".txt":  # blank lines skipped, the numbering kept
        lines, places = [], []
        for i, query in enumerate(queries):
            if i % 40 == 5:
                lines.append("   ")
            lines.append(query)
            places.append(len(lines))
        path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
        return places
    if path.suffix == ".csv":  # a header, and a quoted comma in one query
        frame = pd.DataFrame({"id": range(len(queries)), "query": queries, "k": ks})
        frame["k"] = frame["k"].astype("Int64")
        frame.to_csv(path, index=False)
        return [i + 2 for i in range(len(queries))]
    frame = pd.DataFrame({"query": queries, "k": pd.array(ks, dtype="Int64")})
    frame.to_parquet(path, index=False)
    return list(range(len(queries)))


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".parquet"])
def test_a_file_is_searched_in_batches_as_one_query_at_a_time(
    suffix, champion, world, tiny_world, queries, one_at_a_time, tmp_path
):
    _, bundle = champion
    params = trained_params(world, tiny_world)
    rng = np.random.default_rng(len(suffix))
    texts = [*queries[:-2], "red, dress", queries[-1]]
    # Per-row k in .csv and .parquet, some rows without one (they get --k, 7).
    ks = (
        [None] * N
        if suffix == ".txt"
        else [None if r < 0.3 else int(r * 12) for r in rng.random(N)]
    )
    source = tmp_path / f"queries{suffix}"
    places = _write(source, texts, ks)
    out = tmp_path / "out" / "results.parquet"

    summary = search_file(params, str(bundle), source, 7, out, progress=False)

    assert (summary.queries, summary.requests, summary.warnings) == (N, 3, 1)  # 50 + 50 + 20
    assert summary.out == out and summary.queries_per_second > 0
    table = pd.read_parquet(out)
    assert list(table.columns) == RESULT_SCHEMA.names and len(table) == summary.rows
    assert not list(out.parent.glob(".*.tmp"))
    assert summary.cached == table.drop_duplicates("query_row")["cached"].sum()
    by_place = dict(list(table.groupby("query_row", sort=False)))
    assert list(by_place) == places  # every query, in file order, named by its line or row
    for place, text, k in zip(places, texts, ks, strict=True):
        alone = one_at_a_time(text, 7 if k is None else k)
        got = by_place[place]
        assert (got["query"] == text.strip()).all()
        assert (got["cached"] == alone["cached"]).all()
        if alone["warning"] is not None:  # one row, no product, the model's warning
            assert alone["warning"] == UNKNOWN_WORDS and len(got) == 1
            assert got["product_id"].isna().all() and got["rank"].isna().all()
            assert (got["warning"] == UNKNOWN_WORDS).all()
            continue
        assert got["warning"].isna().all()
        assert list(got["rank"]) == list(range(1, len(alone["product_ids"]) + 1))
        assert list(got["product_id"]) == list(alone["product_ids"])
        np.testing.assert_allclose(got["score"], alone["scores"], atol=1e-5)


# (case, file name, content, what the one error line says after the file's path)
BAD_FILES = [
    ("missing", "absent.txt", None, ": no such file"),
    ("unknown extension", "queries.json", b'["red"]', ": unknown extension '.json'"),
    ("not UTF-8", "queries.txt", b"red dress\nblue \xff cap\n", ": line 2: not UTF-8 text"),
    ("NUL bytes", "queries.txt", b"red\n\x00\x01\x02\n", ": line 2: a NUL byte"),
    ("not Parquet", "queries.parquet", b"PAR1 nonsense", ": not a readable Parquet file"),
    ("broken CSV", "queries.csv", b'query,k\nred,3\n"blue,4\n', ": line 3: not valid CSV"),
    ("no query column", "queries.csv", b"q,k\nred,3\n", ": no 'query' column in the header"),
    ("empty", "queries.txt", b"", ": no queries in it"),
    ("blank lines only", "queries.txt", b"\n  \n\n", ": no queries in it"),
    ("header only", "queries.csv", b"query,k\n", ": no queries in it"),
    ("empty query", "queries.csv", b"query,k\nred,3\n,4\n", ": line 3: 'query' is empty"),
    ("overlong query", "queries.txt", b"red\n\n" + b"x" * 300, ": line 3: 'query' has 300"),
    (
        "k not a number",
        "queries.csv",
        b"query,k\nred,3\nblue,ten\n",
        ": line 3: 'k' must be a whole",
    ),
    ("k a fraction", "queries.csv", b"query,k\nred,2.5\n", ": line 2: 'k' must be a whole"),
    ("k of 0", "queries.csv", b"query,k\nred,3\nblue,0\n", ": line 3: 'k' must be between 1"),
]


def _parquet_bytes(frame: pd.DataFrame, tmp_path: Path) -> bytes:
    path = tmp_path / "made.parquet"
    frame.to_parquet(path, index=False)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("name", "content", "says"), [pytest.param(*case[1:], id=case[0]) for case in BAD_FILES]
)
def test_a_bad_file_is_one_error_line_and_writes_nothing(
    name, content, says, champion, world, tiny_world, tmp_path
):
    _, bundle = champion
    folder = tmp_path / "here"
    folder.mkdir()
    source = folder / name
    if content is not None:
        source.write_bytes(content)
    out = folder / "results.parquet"
    out.write_bytes(b"an earlier result")
    with pytest.raises(AceError) as caught:
        search_file(trained_params(world, tiny_world), str(bundle), source, 5, out, progress=False)
    message = str(caught.value)
    assert message.startswith(f"{source}{says}") and "\n" not in message
    assert out.read_bytes() == b"an earlier result"  # left as it was, and nothing beside it
    assert {p.name for p in folder.iterdir()} == {name, "results.parquet"} - {"absent.txt"}


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (pd.DataFrame({"q": ["red"]}), ": no 'query' column (found 'q')"),
        (pd.DataFrame({"query": ["red", None]}), ": row 1: 'query' is empty"),
        (pd.DataFrame({"query": ["red", "blue"], "k": [3.0, 2.5]}), ": row 1: 'k' must be"),
        (pd.DataFrame({"query": ["red", "blue"], "k": [3, 5000]}), ": row 1: 'k' must be between"),
    ],
    ids=["no query column", "null query", "k a fraction", "k over max_k"],
)
def test_a_bad_parquet_names_the_row(frame, says, champion, world, tiny_world, tmp_path):
    _, bundle = champion
    source = tmp_path / "queries.parquet"
    frame.to_parquet(source, index=False)
    with pytest.raises(AceError, match=f"^{re.escape(str(source) + says)}"):
        search_file(
            trained_params(world, tiny_world), str(bundle), source, 5, tmp_path / "r.parquet"
        )
    assert not (tmp_path / "r.parquet").exists()


def _ace(store: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The real `ace` command, on this checkout's code and the champion's store."""
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": python_path}
    return subprocess.run(
        [str(BIN / "ace"), "search", *args, "--params", str(ROOT / "params.yaml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("content", "name", "says"),
    [
        (b"query,k\nred dress,3\n ,4\n", "queries.csv", "queries.csv: line 3: 'query' is empty"),
        (b"red dress\n", "queries.tsv", "queries.tsv: unknown extension '.tsv'"),
        (None, "queries.txt", "queries.txt: no such file"),
    ],
    ids=["empty query", "unknown extension", "missing"],
)
def test_ace_search_file_fails_in_one_line_and_writes_nothing(
    content, name, says, champion, tmp_path
):
    store, _ = champion
    source = tmp_path / name
    if content is not None:
        source.write_bytes(content)
    out = tmp_path / "results.parquet"
    done = _ace(store, "--file", str(source), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()  # one line, no traceback, no progress bar
    assert line.startswith(f"error: {tmp_path / says}")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_ace_search_file_writes_the_results_and_says_so(champion, queries, tmp_path):
    store, _ = champion
    source = tmp_path / "queries.txt"
    source.write_text("\n".join(queries[:60]) + "\n", encoding="utf-8")
    out = tmp_path / "deep" / "results.parquet"
    done = _ace(store, "--file", str(source), "--k", "3", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("60 queries (") and "in 2 requests" in line and str(out) in line
    table = pd.read_parquet(out)
    assert table["query_row"].nunique() == 60 and table.groupby("query_row").size().max() == 3
    both = _ace(store, "red dress", "--file", str(source), cwd=tmp_path)
    assert (both.returncode, both.stderr.strip()) == (
        1,
        "error: give a QUERY or --file PATH, not both",
    )
    assert math.isfinite(float(table["score"].dropna().iloc[0]))
