"""The one retrieval evaluator: same figures as the metric functions, ANN vs exact, rankers that
lack products, slices, and the content hash that decides "the same rows"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import IndexConfig
from components.retrieval.ann import build_index
from components.retrieval.bm25 import Bm25Ranker
from components.retrieval.evaluator import (
    EmbeddingRanker,
    RetrievalEvaluator,
    click_slices,
    rows_digest,
)
from components.retrieval.retrieval_metrics import exact_top_k, gauc, ranking_metrics, relevant_sets

DIM = 8


@pytest.fixture(scope="module")
def world() -> tuple[pd.DataFrame, list[str], np.ndarray, dict[str, np.ndarray]]:
    """300 products, 40 queries with 10 impressions each (2-3 clicks), random embeddings."""
    rng = np.random.default_rng(0)
    products = [f"p{i:03d}" for i in range(300)]
    product_emb = _normalise(rng.normal(size=(300, DIM)))
    queries = [f"q{i:02d}" for i in range(40)]
    query_emb = {q: _normalise(rng.normal(size=DIM)) for q in queries}
    rows = []
    for query in queries:
        shown = rng.choice(300, 10, replace=False)
        clicked = set(rng.choice(shown, rng.integers(2, 4), replace=False))
        rows += [(query, products[p], int(p in clicked), 5) for p in shown]
    impressions = pd.DataFrame(rows, columns=["query", "product_id", "clicked", "day"])
    return impressions, products, product_emb, query_emb


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _ranker(world, index=None, keep: np.ndarray | None = None) -> EmbeddingRanker:
    _, products, product_emb, query_emb = world
    rows = np.arange(len(products)) if keep is None else keep
    return EmbeddingRanker(
        [products[i] for i in rows],
        product_emb[rows],
        lambda qs: np.stack([query_emb[q] for q in qs]),
        index,
    )


def test_figures_equal_the_metric_functions_by_hand(world):
    impressions, products, product_emb, query_emb = world
    figures = RetrievalEvaluator(impressions, products)(_ranker(world))

    row = {p: i for i, p in enumerate(products)}
    scores = np.array(
        [
            query_emb[q] @ product_emb[row[p]]
            for q, p in zip(impressions["query"], impressions["product_id"], strict=True)
        ]
    )
    assert figures["gauc"] == pytest.approx(gauc(impressions, scores)[0])
    queries, relevant = relevant_sets(impressions, None, row)
    top = exact_top_k(np.stack([query_emb[q] for q in queries]), product_emb, 100)[1]
    expected = ranking_metrics(top, relevant, (10, 50, 100))
    for key in ("recall@10", "recall@50", "recall@100", "mrr", "ndcg@10"):
        assert figures[key.replace("@", "_at_")] == pytest.approx(expected[key]), key
    assert figures["queries"] == 40 and figures["rows"] == 400


def test_ranking_goes_through_the_index_and_exact_is_reported_beside_it(world):
    impressions, products, product_emb, _ = world
    evaluator = RetrievalEvaluator(impressions, products)
    flat = evaluator(_ranker(world, build_index(product_emb, IndexConfig(type="flat"))))
    assert flat["recall_at_100"] == flat["exact_recall_at_100"]
    coarse_cfg = IndexConfig(type="ivf", nlist=16, nprobe=1)
    coarse = evaluator(_ranker(world, build_index(product_emb, coarse_cfg)))
    assert coarse["recall_at_100"] < coarse["exact_recall_at_100"]
    assert coarse["exact_recall_at_100"] == flat["recall_at_100"]
    assert coarse["gauc"] == flat["gauc"]  # pair scores never touch the index


def test_products_a_ranker_lacks_count_against_it(world):
    impressions, products, _, _ = world
    evaluator = RetrievalEvaluator(impressions, products)
    whole = evaluator(_ranker(world))
    clicked = sorted(set(impressions.loc[impressions.clicked == 1, "product_id"]))
    lacking = {products.index(p) for p in clicked[::2]}
    partial = evaluator(_ranker(world, keep=np.array([i for i in range(300) if i not in lacking])))
    assert partial["recall_at_100"] < whole["recall_at_100"]
    assert partial["gauc"] < whole["gauc"]
    assert partial["queries"] == whole["queries"]  # the same rows, not fewer


def test_pair_scorers_such_as_bm25_are_scored_the_same_way():
    titles = ["red dress", "blue dress", "red cap", "green sofa"]
    products = ["a", "b", "c", "d"]
    impressions = pd.DataFrame(
        {
            "query": ["red dress"] * 3 + ["sofa"] * 2,
            "product_id": ["a", "b", "c", "d", "a"],
            "clicked": [1, 0, 0, 1, 0],
            "day": 0,
        }
    )
    figures = RetrievalEvaluator(impressions, products, ks=(1, 2))(Bm25Ranker(products, titles))
    assert figures["gauc"] == 1.0 and figures["recall_at_1"] == 1.0 and figures["mrr"] == 1.0
    assert "exact_recall_at_1" not in figures  # BM25 is exact already


def test_rows_outside_the_catalogue_are_dropped_and_counted(world):
    impressions, products, _, _ = world
    extra = impressions.head(3).assign(product_id="unknown")
    evaluator = RetrievalEvaluator(pd.concat([impressions, extra]), products)
    assert evaluator.rows_dropped == 3
    assert evaluator.digest == RetrievalEvaluator(impressions, products).digest


def test_the_digest_tells_apart_rows_that_differ_in_anything():
    rows = pd.DataFrame(
        {"query": ["a", "b"], "product_id": ["x", "y"], "clicked": [1, 0], "day": [3, 3]}
    )
    assert rows_digest(rows) == rows_digest(rows.copy())
    assert rows_digest(rows) != rows_digest(rows.assign(clicked=[0, 1]))
    assert rows_digest(rows) != rows_digest(rows.assign(day=[4, 4]))


def test_slices_split_the_clicks_by_what_the_title_says(tmp_path: Path):
    truth = tmp_path / "truth"
    truth.mkdir()
    pd.DataFrame(
        {
            "product_id": ["says_red", "omits", "misstates", "plain"],
            "color": ["red", "red", "red", "blue"],
            "title_color": ["red", None, "green", "blue"],
            "pattern": ["solid"] * 4,
            "title_pattern": ["solid"] * 4,
        }
    ).to_parquet(truth / "products.parquet")
    pd.DataFrame(
        {"query": ["red dress", "dress"], "color": ["red", None], "pattern": None}
    ).to_parquet(truth / "queries.parquet")
    impressions = pd.DataFrame(
        {
            "query": ["red dress"] * 4 + ["dress"],
            "product_id": ["says_red", "omits", "misstates", "plain", "omits"],
            "clicked": [1, 1, 1, 0, 1],
            "day": 5,
        }
    )
    train = pd.DataFrame({"query": ["red dress"], "product_id": ["says_red"], "clicked": [1]})
    slices = click_slices(impressions, train, tmp_path)
    # Only where the query names a colour the title omits or misstates does the image alone tell.
    assert list(slices["image"]) == [False, True, True, False, False]
    assert list(slices["text"]) == [True, False, False, False, True]
    assert list(slices["cold"]) == [False, True, True, False, True]  # never clicked in training
    assert set(click_slices(impressions, train, None)) == {"cold"}  # no truth: no image slice

    scores = {"says_red": 0.9, "plain": 0.5, "misstates": 0.2, "omits": 0.1}

    class Fixed:
        def __init__(self) -> None:
            self.product_ids = list(scores)

        def score_pairs(self, queries, rows):
            return np.array([scores[self.product_ids[r]] for r in rows])

        def top_k(self, queries, k):
            return np.tile(np.arange(k), (len(queries), 1))  # product_ids are best first

    evaluator = RetrievalEvaluator(impressions, list(scores), ks=(1, 2), slices=slices)
    figures = evaluator(Fixed())
    # The image slice's clicks rank below the query's non-click: AUC 0, nothing in the top 2.
    assert figures["image_gauc"] == 0.0 and figures["image_recall_at_2"] == 0.0
    assert figures["image_queries"] == 1
    # The text slice: "red dress" finds its click first; "dress" (no non-click: no AUC) misses.
    assert figures["text_gauc"] == 1.0 and figures["text_recall_at_1"] == 0.5
    assert figures["text_queries"] == 2
    assert figures["cold_recall_at_2"] == 0.0


def test_a_judged_query_set_scores_graded_ndcg_and_recall(tmp_path: Path):
    from components.errors import DataError
    from components.retrieval.evaluator import judged_figures, load_judgements

    judged = tmp_path / "judged.csv"
    pd.DataFrame(
        {
            "query": ["red dress"] * 3 + ["sofa"] * 2 + ["lamp"],
            "product_id": ["a", "b", "c", "d", "x", "a"],
            "label": ["E", "S", "I", "Exact", "Partial", "irrelevant"],
        }
    ).to_csv(judged, index=False)
    judgements = load_judgements(judged)
    assert list(judgements["gain"]) == [1.0, 0.1, 0.0, 1.0, 0.5, 0.0]

    class Fixed:  # ranks c, b, a, d for every query
        def __init__(self) -> None:
            self.product_ids = ["c", "b", "a", "d"]

        def score_pairs(self, queries, rows):
            return -np.asarray(rows, float)

        def top_k(self, queries, k):
            return np.tile(np.arange(min(k, 4)), (len(queries), 1))

    figures = judged_figures(judgements, Fixed(), ks=(1, 3))
    # "lamp" has no relevant product: left out. "x" is judged but not in the catalogue: a miss.
    assert figures["judged_queries"] == 2
    red = (0.1 / np.log2(3) + 1.0 / np.log2(4)) / (1.0 + 0.1 / np.log2(3))
    sofa = (1.0 / np.log2(5)) / (1.0 + 0.5 / np.log2(3))
    assert figures["judged_ndcg_at_10"] == pytest.approx((red + sofa) / 2)
    assert figures["judged_recall_at_1"] == 0.0 and figures["judged_recall_at_3"] == 0.5

    bad = tmp_path / "bad.csv"
    pd.DataFrame({"query": ["q"], "product_id": ["a"], "label": ["maybe"]}).to_csv(bad)
    with pytest.raises(DataError, match="unknown label"):
        load_judgements(bad)
