"""The product index and the hot-query cache (paper 4.7), saved so a crash never leaves half.

- Product embeddings (the fine-tuned product tower's, from `evaluate`) go into a FAISS
  inner-product index of `index.type`: `flat` (exact), `hnsw`, `ivf` or `ivfpq`. Embeddings are
  L2-normalised, so inner product is cosine. Row i of the index is `product_ids[i]`.
- The hot-query cache holds the teacher's query embeddings of the most frequent training-day
  queries: the fewest top queries that cover `hot_traffic_share` of the training searches, at
  most `hot_max_queries`. A search for a cached query needs no encoder at all.
- The folder is written aside and swapped in by renames (components/atomic.py): the previous
  index stays whole until the new one is complete, and `load` falls back to it while a swap is
  between its two renames (or was killed there), so a servable index exists at every instant.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from components.atomic import publish_dir, readable_dir
from components.config import Params
from components.data.clicklog import split_days, validated_table
from components.errors import DataError
from components.retrieval.ann import build_index
from components.retrieval.retrieval import (
    PRODUCT_EMBEDDINGS,
    PRODUCT_IDS,
    embed_queries,
    load_retriever,
)
from components.retrieval.retrieval_metrics import exact_top_k

log = logging.getLogger(__name__)

INDEX_FILE = "products.faiss"
IDS_FILE = "product_ids.json"
MANIFEST = "manifest.json"
HOT_FILE = "hot_cache.json"
HOT_EMBEDDINGS = "hot_cache.npy"
PRODUCT_VECTORS = "product_embeddings.npy"


def hot_cache_queries(train_impressions: pd.DataFrame, share: float, max_queries: int) -> list[str]:
    """Most frequent training queries (by searches) covering `share` of them, at most `max`."""
    searches = _searches(train_impressions)
    counts = searches["query"].value_counts()
    counts = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    covered = counts.cumsum() / counts.sum()
    n = int(np.searchsorted(covered.to_numpy(), share) + 1)
    return list(counts.index[: min(n, max_queries)])


def _searches(impressions: pd.DataFrame) -> pd.DataFrame:
    """One row per search: (search_id, query) when there is a search id, else per impression."""
    if "search_id" in impressions:
        return impressions.drop_duplicates("search_id")[["search_id", "query"]]
    return impressions[["query"]]


def build(params: Params, out_dir: Path, progress: bool = True) -> dict[str, float]:
    start = time.perf_counter()
    cfg = params.index
    artifacts = params.paths.artifacts_dir
    embeddings_file = artifacts / "evaluate" / PRODUCT_EMBEDDINGS
    if not embeddings_file.exists():
        raise DataError(f"{embeddings_file}: no product embeddings (run the evaluate stage)")
    vectors = np.load(embeddings_file).astype(np.float32)
    teacher_dir = artifacts / "finetune" / "model"
    teacher, tokenizer = load_retriever(teacher_dir)
    ids_file = embeddings_file.with_name(PRODUCT_IDS)
    product_ids = json.loads(ids_file.read_text(encoding="utf-8"))
    if len(product_ids) != len(vectors):
        raise DataError(f"{embeddings_file}: {len(vectors)} rows for {len(product_ids)} products")

    log.info("index: building a %s index over %d products", cfg.type, len(vectors))
    built = time.perf_counter()
    index = build_index(vectors, cfg)
    build_seconds = time.perf_counter() - built
    log.info("index: built in %.1f s; embedding the hot queries", build_seconds)

    impressions = validated_table(artifacts, "impressions")
    periods = split_days(impressions, params.split)
    train, test = periods.train, periods.test
    hot = hot_cache_queries(train, cfg.hot_traffic_share, cfg.hot_max_queries)
    max_len = params.finetune.max_query_len
    batch = params.evaluate.batch_size
    device = teacher.device
    hot_emb = embed_queries(teacher, tokenizer, hot, max_len, batch, device)
    test_searches = _searches(test)
    served = float(test_searches["query"].isin(set(hot)).mean()) if len(test_searches) else 0.0

    # ANN recall@K against the exact search, on the test queries.
    queries = sorted(test["query"].unique())
    query_emb = embed_queries(teacher, tokenizer, queries, max_len, batch, device)
    k = min(cfg.recall_k, len(vectors))
    exact = exact_top_k(query_emb, vectors, k)[1]
    approximate = index.search(np.ascontiguousarray(query_emb), k)[1]
    overlap = [len(set(a) & set(e)) / k for a, e in zip(approximate, exact, strict=True)]
    log.info(
        "index: %d hot queries cached (%.0f%% of test searches); ANN recall@%d vs exact %.3f",
        len(hot),
        100 * served,
        k,
        float(np.mean(overlap)) if overlap else 0.0,
    )

    manifest = {
        "type": cfg.type,
        "n_products": len(product_ids),
        "dim": int(vectors.shape[1]),
        "settings": cfg.model_dump(mode="json"),
        "hot_queries": len(hot),
        "embeddings": str(embeddings_file),
    }
    publish_index(Path(out_dir), index, product_ids, manifest, hot, hot_emb, vectors)
    return {
        "n_products": float(len(product_ids)),
        f"ann_recall_at_{k}_vs_exact": float(np.mean(overlap)) if overlap else 0.0,
        "hot_cache_queries": float(len(hot)),
        "hot_cache_share_of_training_searches": _share(_searches(train), hot),
        "hot_cache_share_of_test_searches": served,
        "build_seconds": build_seconds,
        "seconds": time.perf_counter() - start,
    }


def extend(
    index_dir: Path, new_ids: list[str], new_vectors: np.ndarray, out_dir: Path
) -> dict[str, float]:
    """The index in `index_dir` with these products added, published whole to `out_dir`.

    Nothing is re-trained: an HNSW graph and a flat index take the vectors as they come, an IVF
    index files them under the centroids of its full build (its lists grow unevenly with many
    additions; the weekly retrain rebuilds it). The hot-query cache is kept as it is."""
    start = time.perf_counter()
    index, product_ids, manifest, hot, hot_emb = load(index_dir)
    vectors = np.load(readable_dir(index_dir) / PRODUCT_VECTORS)
    overlap = set(product_ids) & set(new_ids)
    if overlap:
        raise DataError(f"{index_dir}: already indexes {len(overlap)} of the products to add")
    added = np.ascontiguousarray(new_vectors, dtype=np.float32)
    index.add(added)
    manifest = {
        **manifest,
        "n_products": len(product_ids) + len(new_ids),
        "added_products": manifest.get("added_products", 0) + len(new_ids),
    }
    publish_index(
        Path(out_dir),
        index,
        [*product_ids, *new_ids],
        manifest,
        hot,
        hot_emb,
        np.concatenate([vectors, added]),
    )
    return {"products_added": float(len(new_ids)), "seconds": time.perf_counter() - start}


def _share(searches: pd.DataFrame, hot: list[str]) -> float:
    return float(searches["query"].isin(set(hot)).mean()) if len(searches) else 0.0


def publish_index(
    out_dir: Path,
    index: faiss.Index,
    product_ids: list[str],
    manifest: dict,
    hot: list[str],
    hot_emb: np.ndarray,
    vectors: np.ndarray,
) -> None:
    def write(work: Path) -> None:
        np.save(work / PRODUCT_VECTORS, vectors.astype(np.float32))  # exact scores of given pairs
        faiss.write_index(index, str(work / INDEX_FILE))
        (work / IDS_FILE).write_text(json.dumps(product_ids) + "\n", encoding="utf-8")
        (work / HOT_FILE).write_text(json.dumps(hot) + "\n", encoding="utf-8")
        np.save(work / HOT_EMBEDDINGS, hot_emb.astype(np.float32))
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    publish_dir(out_dir, write)


def load(index_dir: Path) -> tuple[faiss.Index, list[str], dict, list[str], np.ndarray]:
    """(index, product_ids, manifest, hot queries, hot embeddings) as `build` saved them."""
    index_dir = readable_dir(index_dir)
    if not (index_dir / MANIFEST).exists():
        raise DataError(f"{index_dir}: no index here (run the index stage)")
    return (
        faiss.read_index(str(index_dir / INDEX_FILE)),
        json.loads((index_dir / IDS_FILE).read_text(encoding="utf-8")),
        json.loads((index_dir / MANIFEST).read_text(encoding="utf-8")),
        json.loads((index_dir / HOT_FILE).read_text(encoding="utf-8")),
        np.load(index_dir / HOT_EMBEDDINGS),
    )
