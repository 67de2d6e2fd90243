"""BM25 over product titles: the traditional term-matching baseline the learned models must beat.

The index is `bm25s` (Lucene's BM25 variant, k1=1.5, b=0.75 by default): sparse, in memory,
nothing downloaded at run time. Tokenisation is ours, not bm25s's: lowercase, then split on
anything that is not a letter or a digit (Unicode-aware, underscore counts as a separator). No
stemming and no stop words, so the baseline depends on no language resource and does exactly
what the synthetic and real titles' vocabularies allow: a word matches only itself.

Ranking ties (typically the many products a query shares no term with, all scored 0) are broken
by catalogue row, lowest first, so the top-K and with it Recall@K are deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import bm25s
import numpy as np

_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercased runs of letters and digits: 'Red T-Shirt, 2XL' -> ['red', 't', 'shirt', '2xl']."""
    return _TOKEN.findall(str(text).lower())


class Bm25Retriever:
    """Scores every catalogue title against a query with BM25, for top-K retrieval and GAUC."""

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        self._index: bm25s.BM25 | None = None
        self.n_products = 0

    def fit(self, titles: list[str]) -> Bm25Retriever:
        """Index the titles; product i is row i of `titles` in every later result."""
        corpus = [tokenize(t) for t in titles]
        if not any(corpus):
            raise ValueError("no title has a single token to index")
        index = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
        index.index(corpus, show_progress=False)
        self._index = index
        self.n_products = len(corpus)
        return self

    def _scores(self, query: str) -> np.ndarray:
        """BM25 score of one query against every product (0 where no term matches)."""
        if self._index is None:
            raise RuntimeError("Bm25Retriever.fit must run before scoring")
        ids = self._index.get_tokens_ids(tokenize(query))  # unknown terms drop out
        return np.asarray(self._index.get_scores_from_ids(ids), dtype=np.float32)

    def top_k(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k products over the whole catalogue per query: (scores, indices), best first.

        k is clipped to the catalogue size; equal scores are ordered by catalogue row.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if self._index is None:
            raise RuntimeError("Bm25Retriever.fit must run before scoring")
        k = min(k, self.n_products)
        out_scores = np.empty((len(queries), k), dtype=np.float32)
        out_indices = np.empty((len(queries), k), dtype=np.int64)
        for i, query in enumerate(queries):
            scores = self._scores(query)
            # The k-th largest score splits the catalogue: all above it, then the lowest rows
            # among those equal to it. O(catalogue) per query instead of a full sort.
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            above = np.flatnonzero(scores > kth)
            above = above[np.argsort(-scores[above], kind="stable")]
            tied = np.flatnonzero(scores == kth)[: k - len(above)]
            best = np.concatenate([above, tied])
            out_indices[i] = best
            out_scores[i] = scores[best]
        return out_scores, out_indices

    def score_pairs(self, queries: list[str], product_indices: np.ndarray) -> np.ndarray:
        """BM25 score of each (queries[i], product_indices[i]) pair, e.g. impressions for GAUC.

        Each distinct query is scored once against the catalogue, then its pairs are read off.
        """
        products = np.asarray(product_indices, dtype=np.int64).reshape(-1)
        if len(products) != len(queries):
            raise ValueError(f"{len(queries)} queries for {len(products)} product indices")
        if len(products) and (products.min() < 0 or products.max() >= self.n_products):
            raise ValueError(f"product indices must lie in [0, {self.n_products})")
        out = np.zeros(len(products), dtype=np.float32)
        if len(products) == 0:
            return out
        unique, inverse = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(unique)))[:-1]
        for query, rows in zip(unique, np.split(order, bounds), strict=True):
            out[rows] = self._scores(query)[products[rows]]
        return out


class Bm25Ranker:
    """BM25 over a catalogue's titles as a `components.retrieval.evaluator.Ranker`."""

    def __init__(self, product_ids: Sequence[str], titles: list[str]) -> None:
        self.product_ids = list(product_ids)
        self.bm25 = Bm25Retriever().fit(titles)

    def score_pairs(self, queries: list[str], rows: np.ndarray) -> np.ndarray:
        return self.bm25.score_pairs(queries, rows)

    def top_k(self, queries: list[str], k: int) -> np.ndarray:
        return self.bm25.top_k(queries, k)[1]
