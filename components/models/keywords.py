"""MAKE's keyword enhancement, as designed here from its abstract (docs/make.md).

Queries are 1-4 words against long, noisy titles. For every training query, its keywords are the
title words that the products clicked for it share: words in at least `keyword_min_share` of its
clicked titles (click-weighted), ranked by that share times their inverse document frequency over
the catalogue's titles (so "free shipping" boilerplate and words every title has rank last), at
most `keywords_per_query`, from the `keyword_vocabulary` most frequent title words. A query
"crimson gown" thus gets "red" and "dress" when the shoppers who typed it clicked red dresses.

During fine-tuning the query embedding predicts its keywords (a linear head, multi-label
cross-entropy): the short query is pulled toward what its clicked titles say. The head is a
training signal only: serving never runs it, so the query tower's cost is unchanged. Only the
training days' clicks are read; validation and test days never are.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd

from components.config import MakeConfig

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> set[str]:
    return set(_WORD.findall(str(text).lower()))


def query_keywords(
    train: pd.DataFrame, titles: dict[str, str], cfg: MakeConfig
) -> tuple[list[str], dict[str, list[int]]]:
    """(keyword vocabulary, query -> indices of its keywords) from the training days' clicks."""
    title_words = {pid: words(title) for pid, title in titles.items()}
    frequency = Counter(w for ws in title_words.values() for w in ws)
    vocabulary = [w for w, _ in sorted(frequency.items(), key=lambda x: (-x[1], x[0]))]
    vocabulary = vocabulary[: cfg.keyword_vocabulary]
    index = {w: i for i, w in enumerate(vocabulary)}
    idf = {w: np.log(len(title_words) / frequency[w]) for w in vocabulary}
    clicked = train[(train["clicked"] == 1) & train["product_id"].isin(title_words)]
    keywords: dict[str, list[int]] = {}
    for query, group in clicked.groupby("query", sort=True):
        counts = Counter(w for pid in group["product_id"] for w in title_words[pid] if w in index)
        n = len(group)
        scored = [
            (share * idf[w], w)
            for w, c in counts.items()
            if (share := c / n) >= cfg.keyword_min_share and idf[w] > 0
        ]
        best = sorted(scored, key=lambda x: (-x[0], x[1]))[: cfg.keywords_per_query]
        if best:
            keywords[query] = [index[w] for _, w in best]
    return vocabulary, keywords


def targets(queries: list[str], keywords: dict[str, list[int]], size: int) -> np.ndarray:
    """(n, size) float32 multi-hot keyword targets of these queries (all zero when none)."""
    out = np.zeros((len(queries), size), np.float32)
    for row, query in enumerate(queries):
        out[row, keywords.get(query, [])] = 1.0
    return out
