"""Offline evaluation of the fine-tuned towers, beside the baselines, on the same rows.

One `RetrievalEvaluator` (components/retrieval/evaluator.py, BRIEF.md's metric definitions) scores
the towers on the test days (the headline figures) and on the validation days (`val_*`, what every
choice is made on). Recall@K, MRR and nDCG rank through a FAISS index of `index.type` (what the
served retriever answers from); the same figures through exact search are `exact_*`. The image,
text and cold-start slices are reported beside them (`image_*`, `text_*`, `cold_*`).

The catalogue is every product with a stored image (what the towers can retrieve); impressions of
other products are dropped and counted (`test_rows_without_image`). The baselines stage's
figures (BM25 and the sentence-transformers models, measured by the same evaluator) are copied
in with their prefixes after checking they were measured on exactly these test rows, so one
metrics file and one MLflow run hold the whole comparison.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import Params
from components.data import contract
from components.data.clicklog import load_validated
from components.errors import DataError
from components.features.backbones import resolve_device
from components.features.features import FeatureStore
from components.ops.plot_data import RECALL, write_recall_curves
from components.ops.plots import figure
from components.retrieval.ann import build_index
from components.retrieval.baselines import LABELS, RESULTS_FILE
from components.retrieval.evaluator import (
    PERIOD_PREFIX,
    EmbeddingRanker,
    judged_figures,
    load_judgements,
    period_evaluators,
    prefixed,
)
from components.retrieval.retrieval import (
    HOT_QUERIES_FILE,
    PRODUCT_EMBEDDINGS,
    PRODUCT_IDS,
    Catalogue,
    embed_products,
    load_retriever,
    product_modality_weights,
    query_encoder,
)

METRICS_FILE = "metrics.json"
RECALL_CURVE = "recall_curve.png"
EMBEDDING_MAP = "embedding_map.png"
WEIGHTS = "modality_weights.png"  # modal adaptation's image weights (MAKE variants)


def evaluate_retriever(params: Params, out_dir: Path, progress: bool = True) -> dict[str, float]:
    start = time.perf_counter()
    cfg = params.evaluate
    device = resolve_device(cfg.device)
    artifacts = params.paths.artifacts_dir
    model_dir = artifacts / "finetune" / "model"
    model, tokenizer = load_retriever(model_dir)
    model.to(device)
    hot = json.loads((model_dir / HOT_QUERIES_FILE).read_text(encoding="utf-8"))
    products, _, periods = load_validated(params)
    store = FeatureStore(artifacts / "features")
    catalogue = Catalogue.build(
        products, store, params.model, tokenizer, hot, params.finetune.max_product_text_len
    )
    product_emb = embed_products(model, catalogue, cfg.batch_size, device, progress)
    max_len = params.finetune.max_query_len

    encode = query_encoder(model, tokenizer, max_len, cfg.batch_size, device)
    ranker = EmbeddingRanker(
        catalogue.product_ids, product_emb, encode, build_index(product_emb, params.index)
    )
    evaluators = period_evaluators(params, periods, catalogue.product_ids)
    metrics: dict[str, float] = {}
    for period, evaluator in evaluators.items():
        metrics.update(prefixed(evaluator(ranker), PERIOD_PREFIX[period]))
    if cfg.judgements is not None:
        metrics.update(judged_figures(load_judgements(cfg.judgements), ranker, cfg.ks))
    test = evaluators["test"]
    metrics["test_rows_without_image"] = float(test.rows_dropped)
    metrics["n_products"] = float(len(catalogue))
    model_curve = test.recall_curve(ranker)
    curves = {f"ace {params.model.variant} ({params.index.type} index)": model_curve}
    recall_files = {"model": model_curve}  # by file name: the same in every experiment
    baselines = _baseline_results(artifacts, test.digest)
    if baselines is not None:
        metrics.update({k: v for k, v in baselines["metrics"].items() if not k.startswith("val_")})
        for name, curve in baselines["recall_curves"].items():
            curves[LABELS.get(name, name)] = np.asarray(curve)
            recall_files[name] = np.asarray(curve)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = product_modality_weights(model, catalogue, cfg.batch_size, device)
    if weights is not None:
        metrics.update(modality_diagnostics(weights[:, 1], catalogue, params.paths.data_dir))
        plot_modality_weights(weights[:, 1], catalogue, params.paths.data_dir, out_dir / WEIGHTS)
    np.save(out_dir / PRODUCT_EMBEDDINGS, product_emb)
    (out_dir / PRODUCT_IDS).write_text(json.dumps(catalogue.product_ids) + "\n", encoding="utf-8")
    plot_recall_curves(curves, params.model.variant, out_dir / RECALL_CURVE)
    write_recall_curves(recall_files, params.paths.plots_dir / RECALL)  # for `dvc plots`
    queries = sorted(periods.test["query"].unique())
    query_categories = _query_categories(test.impressions, catalogue)
    plot_embedding_map(
        ranker.embed(queries),
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


def _title_tells(catalogue: Catalogue, data_dir: Path) -> np.ndarray | None:
    """Per catalogue product: does its title state its true colour and pattern? (the world's
    hidden truth, diagnostics only; None without it)."""
    path = Path(data_dir) / contract.TRUTH_DIR / "products.parquet"
    if not path.exists():
        return None
    truth = pd.read_parquet(path).set_index("product_id").reindex(catalogue.product_ids)
    right = (truth["title_color"] == truth["color"]) & (truth["title_pattern"] == truth["pattern"])
    return right.to_numpy()


def modality_diagnostics(
    image_weight: np.ndarray, catalogue: Catalogue, data_dir: Path
) -> dict[str, float]:
    """Modal adaptation's image weight, overall and where the title does or does not tell the
    colour and pattern: MAKE's gate should lean on the image where the title fails."""
    out = {"ma_image_weight_mean": float(image_weight.mean())}
    tells = _title_tells(catalogue, data_dir)
    if tells is not None and tells.any() and (~tells).any():
        out["ma_image_weight_title_right"] = float(image_weight[tells].mean())
        out["ma_image_weight_title_wrong"] = float(image_weight[~tells].mean())
    return out


def plot_modality_weights(
    image_weight: np.ndarray, catalogue: Catalogue, data_dir: Path, path: Path
) -> None:
    tells = _title_tells(catalogue, data_dir)
    groups = (
        {"all products": image_weight}
        if tells is None
        else {
            "title states colour and pattern": image_weight[tells],
            "title omits or misstates them": image_weight[~tells],
        }
    )
    with figure(path, figsize=(5.5, 3.5)) as (fig, ax):
        for name, values in groups.items():
            ax.hist(values, bins=40, range=(0, 1), alpha=0.6, density=True, label=name)
        ax.set_xlabel("image weight of modal adaptation")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        fig.tight_layout()


def _baseline_results(artifacts: Path, test_digest: str) -> dict | None:
    """The baselines stage's results, refused when measured on other test rows."""
    path = artifacts / "baselines" / RESULTS_FILE
    if not path.exists():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    if results["rows_digest"].get("test") != test_digest:
        raise DataError(
            f"{path}: the baselines were measured on other test rows than these (re-run the "
            "baselines stage)"
        )
    return results


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
    with figure(path, figsize=(5, 3.5)) as (fig, ax):
        for name, curve in curves.items():
            ax.plot(np.arange(1, len(curve) + 1), curve, label=name.rstrip("_"))
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()


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
    from matplotlib import colormaps
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
    palette = colormaps["tab20"].resampled(max(1, len(names)))
    colour = np.array([palette(names.index(c)) for c in labels])
    n_q = len(q_rows)
    with figure(path, figsize=(7, 6)) as (fig, ax):
        ax.scatter(xy[n_q:, 0], xy[n_q:, 1], c=colour[n_q:], s=8, marker="o", alpha=0.5)
        ax.scatter(xy[:n_q, 0], xy[:n_q, 1], c=colour[:n_q], s=14, marker="x", alpha=0.9)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
