"""The offline metrics against independent computations: sklearn per query, brute-force numpy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from components.errors import DataError
from components.retrieval.bm25 import Bm25Retriever, tokenize
from components.retrieval.retrieval_metrics import exact_top_k, gauc, ranking_metrics, relevant_sets


def _impressions_with_ties(seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(60):
        size = int(rng.integers(1, 25))
        clicks = (rng.random(size) < 0.3).astype(np.int64)
        if q == 0:
            clicks[:] = 1  # all-click: no AUC
        if q == 1:
            clicks[:] = 0  # no click: no AUC
        rows += [(f"q{q}", int(c)) for c in clicks]
    frame = pd.DataFrame(rows, columns=["query", "clicked"])
    # Few distinct values, so most queries have tied scores across clicked and non-clicked.
    scores = rng.integers(0, 4, size=len(frame)).astype(np.float32) / 3
    order = rng.permutation(len(frame))  # queries interleaved, as in a real log
    return frame.iloc[order].reset_index(drop=True), scores[order]


def test_gauc_is_impression_weighted_sklearn_auc_per_mixed_query() -> None:
    frame, scores = _impressions_with_ties(seed=7)
    aucs, weights = [], []
    for _, idx in frame.groupby("query").indices.items():
        y = frame["clicked"].to_numpy()[idx]
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, scores[idx]))
            weights.append(len(idx))
    expected = float(np.average(aucs, weights=weights))

    value, n_queries = gauc(frame, scores)

    assert n_queries == len(aucs)
    assert n_queries < frame["query"].nunique()  # q0 and q1 (and maybe more) were skipped
    assert value == pytest.approx(expected, abs=1e-12)
    # The all-click and no-click queries do not move the result.
    kept = ~frame["query"].isin(["q0", "q1"]).to_numpy()
    assert gauc(frame[kept], scores[kept])[0] == pytest.approx(value, abs=1e-12)


def test_gauc_hand_case_and_degenerate_inputs() -> None:
    frame = pd.DataFrame(
        {
            "query": ["a", "a", "a", "b", "b", "c"],
            "clicked": [1, 0, 0, 1, 0, 1],
        }
    )
    # a: the click beats one non-click and ties the other -> AUC 0.75, weight 3.
    # b: the click scores below the non-click -> AUC 0, weight 2. c: one row, skipped.
    scores = np.array([0.5, 0.1, 0.5, 0.2, 0.9, 0.3])
    value, n_queries = gauc(frame, scores)
    assert n_queries == 2
    assert value == pytest.approx((0.75 * 3 + 0.0 * 2) / 5)

    only_clicks = frame[frame["clicked"] == 1]
    nan_value, zero = gauc(only_clicks, scores[frame["clicked"].to_numpy() == 1])
    assert zero == 0 and math.isnan(nan_value)
    with pytest.raises(ValueError, match="scores"):
        gauc(frame, scores[:-1])
    with pytest.raises(ValueError, match="NaN"):
        gauc(frame, np.array([0.1, np.nan, 0, 0, 0, 0]))


def _brute_force(scores: np.ndarray, relevant: list[np.ndarray], depth: int) -> dict[str, float]:
    """Metrics from each relevant product's rank in a full sort of every product."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(len(scores))[:, None]
    ranks[rows, order] = np.arange(scores.shape[1])[None, :]
    out: dict[str, list[float]] = {"recall@10": [], "recall@50": [], "recall@100": []}
    out |= {"mrr": [], "ndcg@10": []}
    for i, rel in enumerate(relevant):
        r = ranks[i, rel]
        for k in (10, 50, 100):
            out[f"recall@{k}"].append(float(np.sum(r < k)) / len(rel))
        best = int(r.min())
        out["mrr"].append(1.0 / (best + 1) if best < depth else 0.0)
        dcg = sum(1.0 / math.log2(int(x) + 2) for x in r if x < 10)
        idcg = sum(1.0 / math.log2(j + 2) for j in range(min(len(rel), 10)))
        out["ndcg@10"].append(dcg / idcg)
    return {key: float(np.mean(v)) for key, v in out.items()}


def test_exact_top_k_metrics_match_a_full_sort() -> None:
    rng = np.random.default_rng(3)
    n_queries, n_products, dim = 40, 300, 16
    queries = rng.normal(size=(n_queries, dim)).astype(np.float32)
    products = rng.normal(size=(n_products, dim)).astype(np.float32)
    full = queries.astype(np.float64) @ products.astype(np.float64).T
    order = np.argsort(-full, axis=1)
    relevant = []
    for i in range(n_queries):
        size = int(rng.integers(1, 9))
        # Half drawn near the top so every metric sees hits, half from anywhere (misses).
        pool = order[i, :150] if i % 2 == 0 else np.arange(n_products)
        relevant.append(rng.choice(pool, size=size, replace=False))

    top_scores, top_indices = exact_top_k(queries, products, k=100)

    assert top_indices.shape == (n_queries, 100)
    np.testing.assert_allclose(top_scores, np.take_along_axis(full, order, 1)[:, :100], atol=1e-4)
    got = ranking_metrics(top_indices, relevant)
    expected = _brute_force(full, relevant, depth=100)
    assert got["n_queries"] == n_queries
    assert 0 < got["recall@10"] < got["recall@50"] < got["recall@100"] < 1
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # Sets and arrays are the same input.
    assert ranking_metrics(top_indices, [set(r.tolist()) for r in relevant]) == got


def test_exact_top_k_clips_k_to_the_catalogue() -> None:
    rng = np.random.default_rng(0)
    scores, indices = exact_top_k(rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), k=100)
    assert scores.shape == indices.shape == (3, 5)
    assert sorted(indices[0].tolist()) == [0, 1, 2, 3, 4]
    assert np.all(np.diff(scores, axis=1) <= 0)
    with pytest.raises(ValueError, match="dims"):
        exact_top_k(np.zeros((1, 3)), np.zeros((2, 4)), k=1)


def test_ranking_metrics_hand_case() -> None:
    top = np.array(
        [
            [5, 2, 7, 1, 0, 3, 4, 6, 8, 9],  # T = {2, 9}: hits at ranks 2 and 10
            list(range(10, 20)),  # T = {42}: never retrieved
            [3, 0, 1, 2, 4, 5, 6, 7, 8, 9],  # T = {3}: hit at rank 1
        ]
    )
    relevant = [{2, 9}, {42}, {3}]
    got = ranking_metrics(top, relevant, ks=(1, 3, 10))
    assert got["recall@1"] == pytest.approx((0 + 0 + 1) / 3)
    assert got["recall@3"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert got["recall@10"] == pytest.approx((1 + 0 + 1) / 3)
    assert got["mrr"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    ndcg_a = (1 / math.log2(3) + 1 / math.log2(11)) / (1 + 1 / math.log2(3))
    assert got["ndcg@10"] == pytest.approx((ndcg_a + 0 + 1) / 3)
    assert got["n_queries"] == 3


def test_ranking_metrics_refuses_a_too_shallow_ranking() -> None:
    top = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    with pytest.raises(ValueError, match="shallower"):
        ranking_metrics(top, [{3}])  # K=50 and 100 deeper than 12
    # Unless the ranking is the whole catalogue: then recall@100 = recall over everything.
    got = ranking_metrics(top, [{3, 11}], catalog_size=12)
    assert got["recall@10"] == 0.5 and got["recall@100"] == 1.0
    with pytest.raises(ValueError, match="no relevant"):
        ranking_metrics(top, [set()], catalog_size=12)


def test_relevant_sets_builds_clicked_rows_and_skips_unclicked_queries() -> None:
    test = pd.DataFrame(
        {
            "query": ["red shirt", "red shirt", "red shirt", "hat", "hat", "shoes"],
            "product_id": ["p1", "p2", "p1", "p3", "p1", "p2"],
            "clicked": [1, 0, 1, 0, 0, 1],
        }
    )
    index = {"p1": 10, "p2": 20, "p3": 30}
    queries, sets = relevant_sets(test, ["shoes", "hat", "red shirt"], index)
    assert queries == ["shoes", "red shirt"]  # "hat" has no click
    assert [s.tolist() for s in sets] == [[20], [10]]  # a repeated click counts once
    queries, _ = relevant_sets(test, None, index)
    assert queries == ["red shirt", "shoes"]

    with pytest.raises(DataError, match="not in the catalogue"):
        relevant_sets(test, None, {"p1": 0})
    queries, sets = relevant_sets(test, None, {"p1": 0}, drop_unknown=True)
    assert queries == ["red shirt"] and sets[0].tolist() == [0]


TITLES = [
    "red cotton shirt",
    "blue cotton shirt slim fit",
    "red wool sweater",
    "striped zebra print dress",
    "black leather shoes",
    "cotton socks red",
    "",
]


def test_tokenize_lowercases_and_splits_on_non_alphanumerics() -> None:
    assert tokenize("Red T-Shirt, 2XL_slim") == ["red", "t", "shirt", "2xl", "slim"]


def test_bm25_rare_word_ranks_its_title_first() -> None:
    bm25 = Bm25Retriever().fit(TITLES)
    scores, indices = bm25.top_k(["red ZEBRA"], k=3)
    assert indices[0, 0] == 3  # "zebra" is in one title only: its idf outweighs "red"
    assert scores[0, 0] > scores[0, 1] > 0
    # No matching term: all scores 0, ties broken by catalogue row.
    scores, indices = bm25.top_k(["umbrella"], k=100)
    assert indices.shape == (1, len(TITLES))
    assert indices[0].tolist() == list(range(len(TITLES))) and not scores.any()


def test_bm25_score_pairs_agree_with_top_k() -> None:
    bm25 = Bm25Retriever().fit(TITLES)
    queries = ["red shirt", "cotton", "zebra dress", "red shirt", "nothing"]
    scores, indices = bm25.top_k(queries, k=len(TITLES))
    assert np.all(np.diff(scores, axis=1) <= 0)
    pair_queries = [q for q in queries for _ in range(len(TITLES))]
    pair_scores = bm25.score_pairs(pair_queries, indices.reshape(-1))
    np.testing.assert_allclose(pair_scores, scores.reshape(-1), rtol=1e-6)
    # Shuffled pairs give the same per-pair scores.
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(pair_queries))
    shuffled = bm25.score_pairs([pair_queries[i] for i in perm], indices.reshape(-1)[perm])
    np.testing.assert_allclose(shuffled, pair_scores[perm], rtol=1e-6)
