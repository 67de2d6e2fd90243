"""FAISS inner-product indexes of the served types: flat (exact), HNSW, IVF, IVF-PQ.

Built from L2-normalised embeddings, so inner product is cosine. Used wherever a ranking goes
through the index a retriever serves from: the index stage, evaluate, distill, the baselines.
"""

from __future__ import annotations

import faiss
import numpy as np

from components.config import IndexConfig
from components.errors import AceError


def build_index(vectors: np.ndarray, cfg: IndexConfig) -> faiss.Index:
    """A trained, filled FAISS inner-product index of `cfg.type` over `vectors` (n, d)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    metric = faiss.METRIC_INNER_PRODUCT
    if cfg.type == "flat":
        index = faiss.IndexFlatIP(d)
    elif cfg.type == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, metric)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        nlist = cfg.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        if cfg.type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        else:
            if d % cfg.pq_m:
                raise AceError(f"index.pq_m {cfg.pq_m} does not divide the embedding size {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, cfg.pq_bits, metric)
        index.train(vectors)
        index.nprobe = min(cfg.nprobe, nlist)
        if cfg.type == "ivfpq" and cfg.refine_factor:
            # PQ codes alone cap recall@100 well below 0.95 (benchmarks/bench_index.py): keep
            # the full vectors too and re-rank the best refine_factor x k candidates exactly.
            index = faiss.IndexRefineFlat(index)
            index.k_factor = cfg.refine_factor
    index.add(vectors)
    return index
