"""Offline retrieval metrics, computed the same way for every model so their numbers compare.

The definitions, implemented exactly:

- GAUC: "for each query in the test days' impressions that has at least one click and one
  non-click, the ROC AUC of the model's query-product scores (clicked = positive); the weighted
  mean over queries, weight = that query's number of impressions." Tied scores count half, as in
  sklearn's `roc_auc_score` (average ranks in the Mann-Whitney form of the AUC).
- Recall@K: "for each test query, T = the set of products clicked for it in the test days;
  E = the model's top-K products from the whole catalog; Recall@K = |E ∩ T| / |T|; mean over
  queries (queries with at least one click)."
- MRR: the reciprocal rank of the first clicked product in the model's ranking, 0 if none is
  within the searched depth; mean over the same queries.
- nDCG@10: binary relevance (clicked = 1), DCG = sum over the top 10 of rel / log2(rank + 1);
  the ideal DCG puts min(|T|, 10) relevant products first.

The whole-catalogue top-K is exact (a flat inner-product FAISS index), so a recall gap between
models is the models', never an approximate index's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import faiss
import numpy as np
import pandas as pd

from components.errors import DataError


def gauc(
    impressions: pd.DataFrame,
    scores: np.ndarray,
    query_col: str = "query",
    click_col: str = "clicked",
) -> tuple[float, int]:
    """Impression-weighted mean of per-query AUCs; returns (gauc, number of queries counted).

    One groupby rank over all rows instead of a sklearn call per query, so ~30k impressions in ~3k
    queries take milliseconds. Rows are matched to `scores` by position. With no query that has
    both a click and a non-click the GAUC is undefined: (nan, 0).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(impressions):
        raise ValueError(f"{len(scores)} scores for {len(impressions)} impressions")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    queries = impressions[query_col]
    if queries.isna().any():
        raise ValueError(f"column {query_col!r} has missing values")
    clicks = impressions[click_col].to_numpy()
    if not np.isin(clicks, (0, 1)).all():
        raise ValueError(f"column {click_col!r} must hold only 0/1 (or booleans)")
    positive = clicks.astype(bool)

    frame = pd.DataFrame({"q": queries.to_numpy(), "pos": positive, "s": scores})
    # Average ranks within each query: ties get the mean rank, which makes them count half.
    frame["rank_pos"] = frame.groupby("q", sort=False)["s"].rank(method="average") * positive
    per_query = frame.groupby("q", sort=False).agg(
        n=("pos", "size"), n_pos=("pos", "sum"), rank_sum=("rank_pos", "sum")
    )
    n = per_query["n"].to_numpy(dtype=np.float64)
    n_pos = per_query["n_pos"].to_numpy(dtype=np.float64)
    n_neg = n - n_pos
    mixed = (n_pos > 0) & (n_neg > 0)
    if not mixed.any():
        return float("nan"), 0
    rank_sum = per_query["rank_sum"].to_numpy(dtype=np.float64)[mixed]
    auc = (rank_sum - n_pos[mixed] * (n_pos[mixed] + 1) / 2) / (n_pos[mixed] * n_neg[mixed])
    weights = n[mixed]
    return float(np.sum(auc * weights) / np.sum(weights)), int(mixed.sum())


def exact_top_k(
    query_emb: np.ndarray, product_emb: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k products by inner product for each query: (scores, indices), best first.

    A flat FAISS index searches every product, so the result is the true top-k (cosine
    similarity when both sides are L2-normalised). k is clipped to the catalogue size.
    """
    queries = np.ascontiguousarray(query_emb, dtype=np.float32)
    products = np.ascontiguousarray(product_emb, dtype=np.float32)
    if queries.ndim != 2 or products.ndim != 2:
        raise ValueError("query_emb and product_emb must be 2-D (rows x dim)")
    if queries.shape[1] != products.shape[1]:
        raise ValueError(f"dims differ: queries {queries.shape[1]}, products {products.shape[1]}")
    if len(products) == 0:
        raise ValueError("no products to search")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    index = faiss.IndexFlatIP(products.shape[1])
    index.add(products)
    top_scores, top_indices = index.search(queries, min(k, len(products)))
    return top_scores, top_indices.astype(np.int64, copy=False)


def ranking_metrics(
    top_indices: np.ndarray,
    relevant: Sequence[set[int]] | Sequence[np.ndarray],
    ks: Iterable[int] = (10, 50, 100),
    catalog_size: int | None = None,
) -> dict[str, float]:
    """Recall@K for each K, MRR and nDCG@10 of ranked product rows against clicked sets.

    `top_indices[i]` is query i's ranking (best first) and `relevant[i]` its non-empty T. A K
    deeper than the ranking would silently understate recall, so it is refused unless the
    ranking already covers the whole catalogue (`catalog_size` equal to its depth).
    """
    top = np.asarray(top_indices)
    if top.ndim != 2:
        raise ValueError("top_indices must be 2-D (queries x depth)")
    if len(top) != len(relevant):
        raise ValueError(f"{len(top)} rankings for {len(relevant)} relevant sets")
    if len(top) == 0:
        raise ValueError("no queries to evaluate")
    depth = top.shape[1]
    ks = tuple(ks)
    whole_catalog = catalog_size is not None and depth >= catalog_size
    too_deep = [k for k in (*ks, 10) if k > depth]
    if too_deep and not whole_catalog:
        raise ValueError(
            f"ranking depth {depth} is shallower than K={max(too_deep)} and does not cover "
            "the whole catalogue"
        )

    hits = np.zeros(top.shape, dtype=bool)
    n_relevant = np.zeros(len(top), dtype=np.float64)
    for i, rel in enumerate(relevant):
        rel_arr = np.fromiter(rel, dtype=np.int64) if isinstance(rel, set) else np.asarray(rel)
        rel_arr = np.unique(rel_arr)
        if rel_arr.size == 0:
            raise ValueError(f"query {i} has no relevant product: leave such queries out")
        hits[i] = np.isin(top[i], rel_arr)
        n_relevant[i] = rel_arr.size

    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(hits[:, :k].sum(axis=1) / n_relevant))

    any_hit = hits.any(axis=1)
    first = hits.argmax(axis=1)
    out["mrr"] = float(np.mean(np.where(any_hit, 1.0 / (first + 1), 0.0)))

    cut = min(10, depth)
    discounts = 1.0 / np.log2(np.arange(2, cut + 2))
    dcg = hits[:, :cut] @ discounts
    ideal_len = np.minimum(n_relevant, cut).astype(np.int64)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[ideal_len]
    out["ndcg@10"] = float(np.mean(dcg / ideal))
    out["n_queries"] = float(len(top))
    return out


def relevant_sets(
    impressions_test: pd.DataFrame,
    queries: Sequence[str] | None,
    product_index: dict[str, int],
    query_col: str = "query",
    click_col: str = "clicked",
    product_col: str = "product_id",
    drop_unknown: bool = False,
) -> tuple[list[str], list[np.ndarray]]:
    """T for each query: the catalogue rows of the products clicked for it in the test days.

    Returns (queries, sets) in the order of `queries` (sorted unique test queries when None),
    leaving out queries with no click, since recall is undefined for them. A clicked product
    missing from `product_index` can never be retrieved; dropping it would shrink T and inflate
    recall, so it is an error unless `drop_unknown` says otherwise.
    """
    clicked = impressions_test.loc[
        impressions_test[click_col].astype(bool), [query_col, product_col]
    ].drop_duplicates()
    rows = clicked[product_col].map(product_index)
    unknown = rows.isna()
    if unknown.any():
        if not drop_unknown:
            missing = sorted(clicked.loc[unknown, product_col].astype(str).unique())
            raise DataError(
                f"{len(missing)} clicked products are not in the catalogue index "
                f"(e.g. {', '.join(missing[:5])})"
            )
        clicked, rows = clicked[~unknown], rows[~unknown]
    series = pd.Series(rows.to_numpy(dtype=np.int64), index=clicked[query_col].to_numpy())
    by_query = {q: np.unique(g.to_numpy()) for q, g in series.groupby(level=0, sort=False)}
    order = (
        sorted(impressions_test[query_col].dropna().unique()) if queries is None else list(queries)
    )
    kept = [q for q in order if q in by_query]
    return kept, [by_query[q] for q in kept]
