"""One retrieval evaluator for every model: ace's towers, the served bundle, BM25, the baselines.

In the spirit of sentence-transformers' evaluators: a `RetrievalEvaluator` is built once for one
period's impressions over one catalogue and called on anything that ranks that catalogue (a
`Ranker`); it returns the same metrics for each, on exactly the same rows, so their numbers
compare. The metric definitions are BRIEF.md's (components/retrieval/retrieval_metrics.py):

- `gauc`: per query with a click and a non-click, the AUC of the ranker's scores of its
  impressions, weighted by the query's impressions;
- `recall_at_K` for each K, `mrr`, `ndcg_at_10`: the ranker's top-K over the whole catalogue
  against the products clicked for the query. An embedding ranker ranks through its index (what
  it serves from: paper 4.7's ANN); its exact whole-catalogue ranking gives `exact_*` beside it.

Products a ranker cannot return (a served index built before they arrived) count against it:
they are never in its top-K and score below everything it knows in GAUC.

**Slices** (diagnostics; the world's hidden truth is never model input) split the clicked
impressions; each slice's GAUC keeps the query's non-clicked impressions as negatives and its
Recall@K counts only the slice's clicked products (`<slice>_gauc`, `<slice>_recall_at_K`,
`<slice>_queries`):
- `image`: the query names a colour or pattern that the clicked product's title omits or
  misstates: only the image tells (needs `truth/` with products and queries);
- `text`: every other click;
- `cold`: the clicked product had no click in the training days, so it has no hot queries: only
  its title and image can find it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
import pandas as pd

from components.config import Params
from components.data import contract
from components.data.clicklog import Periods
from components.errors import DataError
from components.retrieval.retrieval_metrics import exact_top_k, gauc, ranking_metrics, relevant_sets

SLICES = ("image", "text", "cold")
PERIOD_PREFIX = {"test": "", "val": "val_"}  # test figures are the headline ones


def metric_name(key: str) -> str:
    """MLflow metric names allow no '@': recall@10 -> recall_at_10."""
    return key.replace("@", "_at_")


class Ranker(Protocol):
    """Anything that scores and ranks a catalogue for queries."""

    product_ids: Sequence[str]

    def score_pairs(self, queries: list[str], rows: np.ndarray) -> np.ndarray:
        """Score of each (queries[i], product_ids[rows[i]]) pair; higher is better."""
        ...

    def top_k(self, queries: list[str], k: int) -> np.ndarray:
        """(n, k) rows into product_ids, best first; -1 where fewer were found."""
        ...


@dataclass
class EmbeddingRanker:
    """Dot products of L2-normalised query and product embeddings (cosine), as the towers rank.

    `encode` embeds queries; `product_embeddings` are in `product_ids` order; `index` is what it
    serves from (None: exact search). Query embeddings are computed once per distinct query.
    """

    product_ids: Sequence[str]
    product_embeddings: np.ndarray
    encode: Callable[[list[str]], np.ndarray]
    index: faiss.Index | None = None
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def embed(self, queries: list[str]) -> np.ndarray:
        new = sorted({q for q in queries if q not in self._cache})
        if new:
            for query, vector in zip(new, self.encode(new), strict=True):
                self._cache[query] = vector
        dim = self.product_embeddings.shape[1]
        if not queries:
            return np.zeros((0, dim), np.float32)
        return np.ascontiguousarray(np.stack([self._cache[q] for q in queries]), np.float32)

    def score_pairs(self, queries: list[str], rows: np.ndarray) -> np.ndarray:
        return (self.embed(queries) * self.product_embeddings[rows]).sum(1)

    def top_k(self, queries: list[str], k: int) -> np.ndarray:
        if self.index is None:
            return self.exact_top_k(queries, k)
        return self.index.search(self.embed(queries), min(k, len(self.product_ids)))[1]

    def exact_top_k(self, queries: list[str], k: int) -> np.ndarray:
        return exact_top_k(self.embed(queries), self.product_embeddings, k)[1]


def rows_digest(impressions: pd.DataFrame) -> str:
    """A content hash of the rows a figure was measured on: same digest, same test rows."""
    columns = [c for c in ("day", "search_id", "query", "product_id", "position", "clicked")]
    frame = impressions[[c for c in columns if c in impressions]].reset_index(drop=True)
    return hashlib.md5(pd.util.hash_pandas_object(frame, index=False).values).hexdigest()


class RetrievalEvaluator:
    """Scores rankers on one period's impressions over one catalogue (see the module doc)."""

    def __init__(
        self,
        impressions: pd.DataFrame,
        product_ids: Sequence[str],
        ks: Sequence[int] = (10, 50, 100),
        slices: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Impressions of products outside `product_ids` are dropped (`rows_dropped`): nobody
        can retrieve them. `slices` are boolean masks over `impressions`' rows."""
        if not len(product_ids):
            raise DataError("no products to rank: the catalogue is empty")
        self.product_ids = list(product_ids)
        self.row_of = {pid: i for i, pid in enumerate(self.product_ids)}
        known = impressions["product_id"].isin(self.row_of).to_numpy()
        self.impressions = impressions[known].reset_index(drop=True)
        self.rows_dropped = int((~known).sum())
        self.ks = tuple(ks)
        self.depth = min(max(*self.ks, 10), len(self.product_ids))  # nDCG@10 needs 10
        self.slices = {name: np.asarray(mask)[known] for name, mask in (slices or {}).items()}
        self.digest = rows_digest(self.impressions)
        self.product_rows = self.impressions["product_id"].map(self.row_of).to_numpy()
        self.queries, self.relevant = relevant_sets(self.impressions, None, self.row_of)
        if not self.queries:
            raise DataError("no query with a click in the evaluated days: nothing to measure")

    def __call__(self, ranker: Ranker, exact: bool = True) -> dict[str, float]:
        """GAUC, Recall@K, MRR, nDCG@10 (+ `exact_*` for embedding rankers with an index, and
        each slice's figures)."""
        to_ours, to_theirs = self._row_maps(ranker)
        scores = self._pair_scores(ranker, to_theirs)
        top = self._translate(ranker.top_k(self.queries, self.depth), to_ours)
        metrics = self._figures(scores, top, "")
        if exact and getattr(ranker, "index", None) is not None:
            exact_top = self._translate(ranker.exact_top_k(self.queries, self.depth), to_ours)
            ranking = self._ranking(exact_top, self.queries, self.relevant)
            metrics.update({f"exact_{k}": v for k, v in ranking.items()})
        for name, mask in self.slices.items():
            metrics.update(self._slice(name, mask, scores, top))
        metrics["queries"] = float(len(self.queries))
        metrics["rows"] = float(len(self.impressions))
        return metrics

    def recall_curve(self, ranker: Ranker) -> np.ndarray:
        """Mean Recall@k for k = 1..depth, through the ranker's own top-K."""
        to_ours, _ = self._row_maps(ranker)
        top = self._translate(ranker.top_k(self.queries, self.depth), to_ours)
        curve = np.zeros(self.depth)
        for ranking, truth in zip(top, self.relevant, strict=True):
            hits = np.isin(ranking, truth).astype(float)
            curve[: len(hits)] += np.cumsum(hits) / len(truth)
        return curve / len(self.relevant)

    def _row_maps(self, ranker: Ranker) -> tuple[np.ndarray, np.ndarray]:
        """(their row -> our row, our row -> their row or -1)."""
        theirs = list(ranker.product_ids)
        if theirs == self.product_ids:
            same = np.arange(len(theirs))
            return same, same
        to_ours = np.array([self.row_of.get(pid, -1) for pid in theirs], np.int64)
        to_theirs = np.full(len(self.product_ids), -1, np.int64)
        known = to_ours >= 0
        to_theirs[to_ours[known]] = np.flatnonzero(known)
        return to_ours, to_theirs

    def _pair_scores(self, ranker: Ranker, to_theirs: np.ndarray) -> np.ndarray:
        rows = to_theirs[self.product_rows]
        known = rows >= 0
        scores = np.zeros(len(rows))
        if known.any():
            queries = list(self.impressions["query"][known])
            scores[known] = ranker.score_pairs(queries, rows[known])
            scores[~known] = scores[known].min() - 1.0  # below everything it can rank
        return scores

    @staticmethod
    def _translate(top: np.ndarray, to_ours: np.ndarray) -> np.ndarray:
        top = np.asarray(top, np.int64)
        return np.where(top >= 0, to_ours[np.maximum(top, 0)], -1)

    def _ranking(
        self, top: np.ndarray, queries: list[str], relevant: list[np.ndarray]
    ) -> dict[str, float]:
        position = {q: i for i, q in enumerate(self.queries)}
        chosen = top[[position[q] for q in queries]]
        figures = ranking_metrics(chosen, relevant, self.ks, catalog_size=len(self.product_ids))
        return {metric_name(k): v for k, v in figures.items() if k != "n_queries"}

    def _figures(self, scores: np.ndarray, top: np.ndarray, prefix: str) -> dict[str, float]:
        value, _ = gauc(self.impressions, scores)
        return {f"{prefix}gauc": value, **self._ranking(top, self.queries, self.relevant)}

    def _slice(
        self, name: str, mask: np.ndarray, scores: np.ndarray, top: np.ndarray
    ) -> dict[str, float]:
        clicked = self.impressions["clicked"].to_numpy().astype(bool)
        rows = ~clicked | mask  # the slice's clicks against the query's non-clicks
        part = self.impressions[rows]
        queries, relevant = relevant_sets(part, None, self.row_of)
        if not queries:
            return {f"{name}_queries": 0.0}
        value, _ = gauc(part, scores[rows])
        ranking = self._ranking(top, queries, relevant)
        out = {f"{name}_gauc": value, f"{name}_queries": float(len(queries))}
        out.update({f"{name}_{k}": v for k, v in ranking.items() if k.startswith("recall")})
        return out


def click_slices(
    impressions: pd.DataFrame, train: pd.DataFrame, data_dir: Path | None
) -> dict[str, np.ndarray]:
    """The diagnostic slices' masks over `impressions` (see the module doc).

    `cold` needs only the training days; `image`/`text` need the world's hidden truth
    (`data_dir/truth/`), absent from a user's own data.
    """
    clicked = impressions["clicked"].to_numpy().astype(bool)
    seen = set(train.loc[train["clicked"] == 1, "product_id"])
    slices = {"cold": clicked & ~impressions["product_id"].isin(seen).to_numpy()}
    truth_dir = Path(data_dir) / contract.TRUTH_DIR if data_dir is not None else None
    if truth_dir is None or not (truth_dir / "queries.parquet").exists():
        return slices
    products = pd.read_parquet(truth_dir / "products.parquet").set_index("product_id")
    queries = pd.read_parquet(truth_dir / "queries.parquet").drop_duplicates("query")
    queries = queries.set_index("query")
    q_colour = impressions["query"].map(queries["color"])
    q_pattern = impressions["query"].map(queries["pattern"])
    pid = impressions["product_id"]
    wrong_colour = q_colour.notna() & (
        pid.map(products["title_color"]) != pid.map(products["color"])
    )
    wrong_pattern = q_pattern.notna() & (
        pid.map(products["title_pattern"]) != pid.map(products["pattern"])
    )
    image_only = (wrong_colour | wrong_pattern).to_numpy()
    slices["image"] = clicked & image_only
    slices["text"] = clicked & ~image_only
    return slices


def period_evaluators(
    params: Params, periods: Periods, product_ids: Sequence[str]
) -> dict[str, RetrievalEvaluator]:
    """Evaluators of the test and (when it has days) validation periods, with their slices."""
    evaluators = {}
    for name, frame in (("test", periods.test), ("val", periods.val)):
        if len(frame):
            slices = click_slices(frame, periods.train, params.paths.data_dir)
            evaluators[name] = RetrievalEvaluator(frame, product_ids, params.evaluate.ks, slices)
    return evaluators


def prefixed(metrics: dict[str, float], *prefixes: str) -> dict[str, float]:
    return {"".join(prefixes) + key: value for key, value in metrics.items()}


# Relevance labels of the public judged query sets, as gains (docs/finetune.md): Amazon's Shopping
# Queries (ESCI: Exact, Substitute, Complement, Irrelevant; the gains of its nDCG) and Wayfair's
# WANDS (Exact, Partial, Irrelevant). A number is taken as the gain itself.
LABEL_GAINS = {
    "e": 1.0,
    "exact": 1.0,
    "s": 0.1,
    "substitute": 0.1,
    "c": 0.01,
    "complement": 0.01,
    "partial": 0.5,
    "i": 0.0,
    "irrelevant": 0.0,
}
JUDGED_COLUMNS = ("query", "product_id", "label")


def load_judgements(path: Path) -> pd.DataFrame:
    """(query, product_id, gain) from a CSV or Parquet judged query set; one line per problem."""
    path = Path(path)
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable judged query set ({err})") from err
    missing = [c for c in JUDGED_COLUMNS if c not in frame]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (query, product_id, label)"
        )
    frame = frame.dropna(subset=list(JUDGED_COLUMNS))
    labels = frame["label"].astype(str).str.strip().str.lower()
    gains = labels.map(LABEL_GAINS)
    numeric = pd.to_numeric(labels, errors="coerce")
    gains = gains.fillna(numeric)
    if gains.isna().any():
        bad = sorted(set(labels[gains.isna()]))[:5]
        raise DataError(
            f"{path}: unknown label(s) {bad}: use E/S/C/I, Exact/Partial/Irrelevant or a number"
        )
    return pd.DataFrame(
        {
            "query": frame["query"].astype(str),
            "product_id": frame["product_id"].astype(str),
            "gain": gains.astype(float).to_numpy(),
        }
    )


def judged_figures(
    judgements: pd.DataFrame, ranker: Ranker, ks: Sequence[int] = (10, 50, 100)
) -> dict[str, float]:
    """nDCG@10 with graded gains and Recall@K of the fully relevant (gain 1) products, over the
    judged queries; judged products the ranker's catalogue lacks count as misses."""
    row_of = {pid: i for i, pid in enumerate(ranker.product_ids)}
    by_query = {q: g for q, g in judgements.groupby("query", sort=True)}
    queries = [q for q, g in by_query.items() if (g["gain"] > 0).any()]
    if not queries:
        raise DataError("the judged query set has no query with a relevant product")
    depth = min(max(*ks, 10), len(row_of))
    top = np.asarray(ranker.top_k(queries, depth))
    discounts = 1.0 / np.log2(np.arange(2, 12))
    ndcg, recalls = [], {k: [] for k in ks}
    for query, ranking in zip(queries, top, strict=True):
        judged = by_query[query]
        pairs = list(zip(judged["product_id"], judged["gain"], strict=True))
        gain_of = {row_of[p]: g for p, g in pairs if p in row_of}
        gains = np.array([gain_of.get(r, 0.0) for r in ranking[:10]])
        ideal = np.sort(judged["gain"].to_numpy())[::-1][:10]
        ndcg.append(float(gains @ discounts[: len(gains)] / (ideal @ discounts[: len(ideal)])))
        exact = {row_of.get(p, -1) for p, g in pairs if g >= 1}
        if exact:
            for k in ks:
                recalls[k].append(len(exact & set(ranking[:k].tolist())) / len(exact))
    out = {"judged_ndcg_at_10": float(np.mean(ndcg)), "judged_queries": float(len(queries))}
    for k, values in recalls.items():
        if values:
            out[f"judged_recall_at_{k}"] = float(np.mean(values))
    return out
