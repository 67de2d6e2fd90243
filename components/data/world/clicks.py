"""The search log: an imperfect production ranker shows products, a position-biased user clicks.

Each day is drawn from its own (seed, CLICKS, day) stream and depends only on the static world
(catalog and queries), so further days can be appended later without touching earlier ones.
Relevance always uses the products' TRUE attributes, which titles may omit or misstate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.config import SynthConfig
from components.data.world.catalog import Catalog
from components.data.world.seeding import Purpose, rng_for
from components.data.world.text import QuerySet

IRRELEVANT, PARTIAL, RELEVANT = 0, 1, 2
# Where the ranker's candidates come from: truly relevant, same category, anything.
RANKER_MIX = (0.5, 0.3, 0.2)
RANKER_SHARPNESS = 0.8  # weight of true relevance against unit Gumbel noise in the shown order
CLICK_PROB_RELEVANT = 0.6  # P(click | examined, fully relevant)
CLICK_PROB_PARTIAL = 0.15  # P(click | examined, right category, wrong colour or pattern)
_DRAWS_PER_SLOT = 3  # candidates drawn per shown slot, so duplicates can be dropped


@dataclass(frozen=True)
class Pools:
    """Per distinct query intent, the products a ranker can draw as relevant or partial (CSR)."""

    intent: np.ndarray  # query -> intent id
    relevant_ptr: np.ndarray
    relevant: np.ndarray  # padded by one entry so empty pools can be indexed safely
    partial_ptr: np.ndarray
    partial: np.ndarray


@dataclass(frozen=True)
class DayLog:
    day: int
    query: np.ndarray  # (searches,) query index
    product: np.ndarray  # (searches, impressions) product index, in shown order
    clicked: np.ndarray  # (searches, impressions) bool


def relevance(
    catalog: Catalog, queries: QuerySet, query: np.ndarray, product: np.ndarray
) -> np.ndarray:
    """Relevance grade of (query, product) pairs from true attributes: every attribute the query
    names matches -> RELEVANT; the category matches but not the rest -> PARTIAL."""
    qc, qk, qp = queries.category[query], queries.colour[query], queries.pattern[query]
    cat_ok = (qc < 0) | (catalog.category[product] == qc)
    full = cat_ok & ((qk < 0) | (catalog.colour[product] == qk))
    full &= (qp < 0) | (catalog.pattern[product] == qp)
    partial = (qc >= 0) & cat_ok & ~full
    return np.where(full, RELEVANT, np.where(partial, PARTIAL, IRRELEVANT)).astype(np.int8)


def _csr(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(lists) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(x) for x in lists])
    return ptr, np.concatenate([*lists, np.zeros(1, dtype=np.int64)])


def build_pools(catalog: Catalog, queries: QuerySet) -> Pools:
    """Group queries by intent (many share one), and list each intent's candidate products."""
    keys = np.stack([queries.category, queries.colour, queries.pattern], axis=1)
    intents, inverse = np.unique(keys, axis=0, return_inverse=True)
    relevant, partial = [], []
    for cat, col, pat in intents:
        cat_ok = catalog.category == cat if cat >= 0 else np.ones(len(catalog), dtype=bool)
        full = cat_ok & ((catalog.colour == col) if col >= 0 else True)
        full &= (catalog.pattern == pat) if pat >= 0 else True
        relevant.append(np.flatnonzero(full))
        partial.append(np.flatnonzero(cat_ok & ~full) if cat >= 0 else np.zeros(0, np.int64))
    relevant_ptr, relevant_idx = _csr(relevant)
    partial_ptr, partial_idx = _csr(partial)
    return Pools(inverse.reshape(-1), relevant_ptr, relevant_idx, partial_ptr, partial_idx)


def _draw(ptr: np.ndarray, items: np.ndarray, intent: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A uniform pick from each row's pool (rows with an empty pool get a dummy, never used)."""
    start, length = ptr[intent][:, None], (ptr[intent + 1] - ptr[intent])[:, None]
    return items[start + (u * length).astype(np.int64)]


def _first_unique(cand: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first `n` distinct candidates in draw order, and how many distinct exist."""
    m = cand.shape[1]
    order = np.argsort(cand, axis=1, kind="stable")
    ranked = np.take_along_axis(cand, order, axis=1)
    dup_ranked = np.zeros(cand.shape, dtype=bool)
    dup_ranked[:, 1:] = ranked[:, 1:] == ranked[:, :-1]  # stable: first occurrence is kept
    dup = np.empty_like(dup_ranked)
    np.put_along_axis(dup, order, dup_ranked, axis=1)
    keep = np.argsort(dup * m + np.arange(m), axis=1, kind="stable")[:, :n]
    return np.take_along_axis(cand, keep, axis=1), (~dup).sum(axis=1)


def simulate_day(
    cfg: SynthConfig, catalog: Catalog, queries: QuerySet, pools: Pools, day: int
) -> DayLog:
    """One day of searches: Zipf query choice, candidate mix, noisy order, position bias."""
    rng = rng_for(cfg.seed, Purpose.CLICKS, day)
    searches, n, n_products = cfg.size.searches_per_day, cfg.impressions_per_search, len(catalog)
    query = rng.choice(len(queries), size=searches, p=queries.popularity)
    intent = pools.intent[query]

    m = _DRAWS_PER_SLOT * n
    kind = rng.choice(3, size=(searches, m), p=RANKER_MIX)
    n_rel = (pools.relevant_ptr[intent + 1] - pools.relevant_ptr[intent])[:, None]
    n_part = (pools.partial_ptr[intent + 1] - pools.partial_ptr[intent])[:, None]
    kind = np.where((kind == 0) & (n_rel == 0), 1, kind)  # empty pool: fall back to the next
    kind = np.where((kind == 1) & (n_part == 0), 2, kind)
    u = rng.random((searches, m))
    cand = np.select(
        [kind == 0, kind == 1],
        [
            _draw(pools.relevant_ptr, pools.relevant, intent, u),
            _draw(pools.partial_ptr, pools.partial, intent, u),
        ],
        rng.integers(0, n_products, size=(searches, m)),
    )
    shown, n_unique = _first_unique(cand, n)
    for row in np.flatnonzero(n_unique < n):  # tiny pools: top up with random products
        picked = list(dict.fromkeys(cand[row].tolist()))
        while len(picked) < n:
            extra = int(rng.integers(n_products))
            if extra not in picked:
                picked.append(extra)
        shown[row] = picked[:n]

    grade = relevance(catalog, queries, query[:, None], shown)
    order = np.argsort(-(RANKER_SHARPNESS * grade + rng.gumbel(size=shown.shape)), axis=1)
    shown = np.take_along_axis(shown, order, axis=1)
    grade = np.take_along_axis(grade, order, axis=1)

    examine = np.arange(1, n + 1, dtype=np.float64) ** -cfg.position_bias_power
    p_click = np.array([cfg.click_noise, CLICK_PROB_PARTIAL, CLICK_PROB_RELEVANT])[grade]
    clicked = rng.random(shown.shape) < examine * p_click
    return DayLog(day, query, shown, clicked)
