"""Offline evaluation on the test days: GAUC, Recall@K, MRR, nDCG@10, for the model and BM25.

The model's Recall@K, MRR and nDCG come from its top-K through the FAISS index of `index.type`
(what the served retriever answers from); the same figures through exact search over the whole
catalogue are reported as `exact_*`.

The metric definitions are BRIEF.md's, implemented in components/retrieval_metrics.py. The
catalogue is every product with a stored image (what the towers can retrieve); test impressions
of other products are dropped and counted (`test_rows_without_image`). BM25 over the same
catalogue's titles is evaluated the same way, as the paper's term-matching "traditional"
retrieval; it reads the title only (no hot queries: those come from the model's side).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from components.backbones import resolve_device
from components.bm25 import Bm25Retriever
from components.config import Params
from components.features import FeatureStore
from components.index import build_index
from components.plot_data import RECALL, write_recall_curves
from components.retrieval import (
    HOT_QUERIES_FILE,
    PRODUCT_EMBEDDINGS,
    PRODUCT_IDS,
    Catalogue,
    embed_products,
    embed_queries,
    load_retriever,
    split_days,
)
from components.retrieval_metrics import exact_top_k, gauc, ranking_metrics, relevant_sets

METRICS_FILE = "metrics.json"
RECALL_CURVE = "recall_curve.png"
EMBEDDING_MAP = "embedding_map.png"


def metric_name(key: str) -> str:
    """MLflow metric names allow no '@': recall@10 -> recall_at_10."""
    return key.replace("@", "_at_")


def evaluate_retriever(params: Params, out_dir: Path, progress: bool = True) -> dict[str, float]:
    start = time.perf_counter()
    cfg = params.evaluate
    device = resolve_device(cfg.device)
    artifacts = params.paths.artifacts_dir
    model_dir = artifacts / "finetune" / "model"
    model, tokenizer = load_retriever(model_dir)
    model.to(device)
    hot = json.loads((model_dir / HOT_QUERIES_FILE).read_text(encoding="utf-8"))
    products = pd.read_parquet(artifacts / "validate" / "products.parquet")
    impressions = pd.read_parquet(artifacts / "validate" / "impressions.parquet")
    store = FeatureStore(artifacts / "features")
    _, test = split_days(impressions, params.split.test_days, params.split.train_days)
    catalogue = Catalogue.build(
        products, store, params.model, tokenizer, hot, params.finetune.max_product_text_len
    )
    index_of = catalogue.index_of()
    kept = test[test["product_id"].isin(index_of)].reset_index(drop=True)

    product_emb = embed_products(model, catalogue, cfg.batch_size, device, progress)
    queries = sorted(kept["query"].unique())
    query_emb = embed_queries(
        model, tokenizer, queries, params.finetune.max_query_len, cfg.batch_size, device
    )
    query_row = {q: i for i, q in enumerate(queries)}
    rows_q = kept["query"].map(query_row).to_numpy()
    rows_p = kept["product_id"].map(index_of).to_numpy()

    bm25 = Bm25Retriever().fit(catalogue.titles)
    max_k = max(cfg.ks)
    scored = {
        "": (query_emb[rows_q] * product_emb[rows_p]).sum(1),
        "bm25_": bm25.score_pairs(list(kept["query"]), rows_p),
    }
    ranked_queries, relevant = relevant_sets(kept, None, index_of)
    chosen = np.ascontiguousarray(query_emb[[query_row[q] for q in ranked_queries]])
    # The headline figures rank through the index the retriever serves from (paper 4.7's ANN);
    # `exact_` ones through the whole catalogue, so the index's cost in recall is visible.
    served_index = build_index(product_emb, params.index)
    rankings = {
        "": served_index.search(chosen, min(max_k, len(catalogue)))[1],
        "exact_": exact_top_k(chosen, product_emb, max_k)[1],
        "bm25_": bm25.top_k(ranked_queries, max_k)[1],
    }
    metrics: dict[str, float] = {}
    curves = {}
    for prefix, scores in scored.items():
        value, n_queries = gauc(kept, scores)
        metrics[f"{prefix}gauc"] = value
        metrics["gauc_queries"] = float(n_queries)
    for prefix, top in rankings.items():
        ranking = ranking_metrics(top, relevant, ks=cfg.ks, catalog_size=len(catalogue))
        for key, value in ranking.items():
            if key != "n_queries":
                metrics[metric_name(f"{prefix}{key}")] = value
        if prefix != "exact_":
            curves[prefix] = recall_curve(top, relevant, max_k)
        metrics["recall_queries"] = float(ranking["n_queries"])
    metrics["test_rows"] = float(len(kept))
    metrics["test_rows_without_image"] = float(len(test) - len(kept))
    metrics["n_products"] = float(len(catalogue))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / PRODUCT_EMBEDDINGS, product_emb)
    (out_dir / PRODUCT_IDS).write_text(json.dumps(catalogue.product_ids) + "\n", encoding="utf-8")
    legend = {prefix or f"model ({params.index.type} index)": c for prefix, c in curves.items()}
    plot_recall_curves(legend, params.model.variant, out_dir / RECALL_CURVE)
    write_recall_curves(curves, params.paths.plots_dir / RECALL)  # for `dvc plots`
    query_categories = _query_categories(kept, catalogue)
    plot_embedding_map(
        query_emb,
        [query_categories.get(q) for q in queries],
        product_emb,
        list(catalogue.categories),
        cfg.map_points,
        cfg.seed,
        f"{params.model.variant}: queries (x) and products (o) by category",
        out_dir / EMBEDDING_MAP,
    )
    metrics["seconds"] = time.perf_counter() - start
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def recall_curve(top: np.ndarray, relevant: list[np.ndarray], max_k: int) -> np.ndarray:
    """Mean Recall@k for k = 1..max_k."""
    curve = np.zeros(max_k)
    for ranking, truth in zip(top, relevant, strict=True):
        hits = np.isin(ranking[:max_k], truth).astype(float)
        curve[: len(hits)] += np.cumsum(hits) / len(truth)
        curve[len(hits) :] += hits.sum() / len(truth)
    return curve / max(1, len(relevant))


def _query_categories(test: pd.DataFrame, catalogue: Catalogue) -> dict[str, str]:
    """Each test query's colour in the map: the category of the products clicked for it most."""
    category = dict(zip(catalogue.product_ids, catalogue.categories, strict=True))
    clicked = test[test["clicked"] == 1]
    cats = clicked["product_id"].map(category)
    top = (
        clicked.assign(category=cats)
        .groupby("query")["category"]
        .agg(lambda c: c.value_counts().index[0])
    )
    return top.to_dict()


def plot_recall_curves(curves: dict[str, np.ndarray], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name.rstrip("_"))
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_embedding_map(
    query_emb: np.ndarray,
    query_categories: list[str | None],
    product_emb: np.ndarray,
    product_categories: list[str],
    points: int,
    seed: int,
    title: str,
    path: Path,
) -> None:
    """t-SNE of a sample of queries and products together, coloured by category (paper Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    with_category = np.array([i for i, c in enumerate(query_categories) if c is not None], int)
    q_rows = rng.permutation(with_category)[:points]
    p_rows = rng.permutation(len(product_emb))[:points]
    stacked = np.concatenate([query_emb[q_rows], product_emb[p_rows]])
    if len(stacked) < 5:
        return
    xy = TSNE(
        n_components=2, perplexity=min(30.0, len(stacked) / 4), init="pca", random_state=seed
    ).fit_transform(stacked)
    labels = [query_categories[i] for i in q_rows] + [product_categories[i] for i in p_rows]
    names = sorted(set(labels))
    palette = plt.get_cmap("tab20", max(1, len(names)))
    colour = np.array([palette(names.index(c)) for c in labels])
    n_q = len(q_rows)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(xy[n_q:, 0], xy[n_q:, 1], c=colour[n_q:], s=8, marker="o", alpha=0.5)
    ax.scatter(xy[:n_q, 0], xy[:n_q, 1], c=colour[:n_q], s=14, marker="x", alpha=0.9)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
