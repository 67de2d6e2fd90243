"""FAISS product index types, the hot-query cache, and the atomic swap of the index folder."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest

from components.config import IndexConfig
from components.retrieval import index as ix
from components.retrieval.retrieval_metrics import exact_top_k


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    x = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.normal(size=(3000, 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(index: faiss.Index, vectors: np.ndarray, k: int = 50) -> float:
    queries = vectors[:200] + 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = exact_top_k(queries, vectors, k)[1]
    found = index.search(queries, k)[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)]))


def test_index_types_against_exact_search(vectors: np.ndarray):
    assert _recall(ix.build_index(vectors, IndexConfig(type="flat")), vectors) == 1.0
    hnsw = ix.build_index(vectors, IndexConfig(type="hnsw"))
    assert _recall(hnsw, vectors) > 0.95
    every_cell = IndexConfig(type="ivf", nlist=20, nprobe=20)
    assert _recall(ix.build_index(vectors, every_cell), vectors) == 1.0  # all cells: exact
    few_cells = _recall(
        ix.build_index(vectors, IndexConfig(type="ivf", nlist=20, nprobe=1)), vectors
    )
    assert few_cells < 1.0
    pq = ix.build_index(vectors, IndexConfig(type="ivfpq", nlist=20, nprobe=20, pq_m=8))
    assert 0.3 < _recall(pq, vectors) < 1.0  # compressed codes: approximate even over every cell
    refined = ix.build_index(
        vectors, IndexConfig(type="ivfpq", nlist=20, nprobe=20, pq_m=8, refine_factor=8)
    )
    assert _recall(refined, vectors) > max(0.95, _recall(pq, vectors))  # exact re-rank
    with pytest.raises(Exception, match="does not divide"):
        ix.build_index(vectors, IndexConfig(type="ivfpq", pq_m=5))


def test_hot_cache_takes_the_fewest_top_queries_covering_the_share():
    searches = ["a"] * 6 + ["b"] * 3 + ["c"] * 1  # 60%, 30%, 10% of the searches
    frame = pd.DataFrame(
        {"search_id": [f"s{i}" for i in range(10)], "query": searches, "day": 0}
    ).loc[lambda d: d.index.repeat(3)]  # three impressions per search: counted once
    assert ix.hot_cache_queries(frame, 0.5, 100) == ["a"]
    assert ix.hot_cache_queries(frame, 0.87, 100) == ["a", "b"]
    assert ix.hot_cache_queries(frame, 0.95, 100) == ["a", "b", "c"]
    assert ix.hot_cache_queries(frame, 0.9, 100) == ["a", "b"]
    assert ix.hot_cache_queries(frame, 1.0, 1) == ["a"]


def test_a_crash_while_writing_leaves_the_previous_index_whole(
    vectors: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "index"
    first = ix.build_index(vectors[:100], IndexConfig(type="flat"))
    ids = [f"p{i}" for i in range(100)]
    hot = np.zeros((1, 32), np.float32)
    ix.publish_index(out, first, ids, {"type": "flat"}, ["q"], hot, vectors[:100])

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ix.faiss, "write_index", crash)
    second = ix.build_index(vectors[:200], IndexConfig(type="flat"))
    with pytest.raises(OSError, match="disk full"):
        ix.publish_index(out, second, ids * 2, {"type": "flat"}, ["q"], hot, vectors[:200])
    monkeypatch.undo()
    index, product_ids, manifest, queries, embeddings = ix.load(out)
    assert index.ntotal == 100 and product_ids == ids and manifest == {"type": "flat"}
    assert queries == ["q"] and embeddings.shape == (1, 32)
    assert json.loads((out / ix.IDS_FILE).read_text()) == ids


def test_a_swap_killed_between_its_renames_still_serves_the_previous_index(
    vectors: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "index"
    ids = [f"p{i}" for i in range(100)]
    hot = np.zeros((1, 32), np.float32)
    first = ix.build_index(vectors[:100], IndexConfig(type="flat"))
    ix.publish_index(out, first, ids, {"type": "flat"}, ["q"], hot, vectors[:100])

    renames: list[Path] = []
    real_rename = Path.rename

    def killed_after_first_rename(self: Path, target: Path) -> Path:
        if renames:  # the process died after the first rename: no later rename happens
            raise KeyboardInterrupt
        renames.append(self)
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_first_rename)
    second = ix.build_index(vectors[:200], IndexConfig(type="flat"))
    with pytest.raises(KeyboardInterrupt):
        ix.publish_index(out, second, ids * 2, {"type": "flat"}, ["q"], hot, vectors[:200])
    monkeypatch.undo()
    assert renames == [out] and not out.exists()  # the instant between the two renames

    index, product_ids, *_ = ix.load(out)  # the loader falls back to the previous index
    assert index.ntotal == 100 and product_ids == ids
    ix.publish_index(out, second, ids * 2, {"type": "flat"}, ["q"], hot, vectors[:200])
    assert ix.load(out)[0].ntotal == 200
    assert not list(tmp_path.glob(".index*"))  # nothing left aside
