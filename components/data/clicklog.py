"""The click log: its split by day, what products and queries are known from the training days,
and the text of a product as the towers read it. Pure pandas / numpy: the baselines and the
evaluator use it without touching the models.

- Every stage after validate reads the validated tables through `validated_table`, and those
  that work on the periods through `load_validated` (the tables and the split in one call).

- The click log splits by day: the last `test_days` days are the test period (the paper's "next
  days"), the `val_days` before them the validation period (early stopping and every tuning
  choice); everything a model learns from (click pairs, hot queries) comes from the
  `train_days` days before those (a sliding window, so a retrain follows the latest behaviour).
- Hot queries (paper 3.2): for each product, the (at most) `k` queries with the most clicks on it
  in the training days; ties go to the alphabetically first query, so the list is deterministic.
- The product side reads `title [SEP] hot query 1 [SEP] hot query 2 ...` (the hot queries only
  for the variants that use them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from components.config import Params, SplitConfig
from components.errors import DataError


@dataclass(frozen=True)
class Periods:
    """The click log cut by day: training window, validation period, test period."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


VALIDATED_DIR = "validate"  # the validate stage's folder under paths.artifacts_dir
PRODUCTS_FILE = "products.parquet"
IMPRESSIONS_FILE = "impressions.parquet"


def validated_table(artifacts: Path, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The validate stage's kept rows of one table ("products" or "impressions")."""
    name = {"products": PRODUCTS_FILE, "impressions": IMPRESSIONS_FILE}[table]
    return pd.read_parquet(Path(artifacts) / VALIDATED_DIR / name, columns=columns)


class Validated(NamedTuple):
    products: pd.DataFrame
    impressions: pd.DataFrame
    periods: Periods


def load_validated(params: Params) -> Validated:
    """The prologue of the stages that learn or measure on the periods: both validated tables,
    and the click log split by `params.split`."""
    artifacts = params.paths.artifacts_dir
    impressions = validated_table(artifacts, "impressions")
    return Validated(
        validated_table(artifacts, "products"), impressions, split_days(impressions, params.split)
    )


def split_days(impressions: pd.DataFrame, split: SplitConfig) -> Periods:
    """The last `test_days` days test, the `val_days` before them validate, the `train_days`
    before those train (0: every earlier day)."""
    days = impressions["day"]
    first_test_day = int(days.max()) - split.test_days + 1
    first_val_day = first_test_day - split.val_days
    if first_val_day <= int(days.min()):
        raise DataError(
            f"the click log spans {days.nunique()} days: too few for {split.test_days} test "
            f"days, {split.val_days} validation days and at least one training day"
        )
    first_train_day = first_val_day - split.train_days if split.train_days else int(days.min())
    return Periods(
        train=impressions[(days >= first_train_day) & (days < first_val_day)],
        val=impressions[(days >= first_val_day) & (days < first_test_day)],
        test=impressions[days >= first_test_day],
    )


def hot_queries(train_impressions: pd.DataFrame, k: int) -> dict[str, list[str]]:
    """product_id -> its at most `k` most-clicked queries (training days only; see module doc)."""
    clicked = train_impressions[train_impressions["clicked"] == 1]
    counts = clicked.groupby(["product_id", "query"]).size().rename("clicks").reset_index()
    counts = counts.sort_values(
        ["product_id", "clicks", "query"], ascending=[True, False, True], kind="stable"
    )
    top = counts.groupby("product_id").head(k)
    return {pid: list(group["query"]) for pid, group in top.groupby("product_id", sort=True)}


def product_text(title: str, hot: list[str], sep: str) -> str:
    return f" {sep} ".join([title, *hot])


@dataclass(frozen=True)
class ClickPairs:
    """Distinct (query, product) training pairs: query index into `queries`, catalogue row."""

    queries: list[str]
    query: np.ndarray
    product: np.ndarray

    def __len__(self) -> int:
        return len(self.query)

    def keys(self, n_products: int) -> np.ndarray:
        """One int64 per pair, sorted: what `also_positive` looks pairs up in."""
        return np.sort(self.query.astype(np.int64) * n_products + self.product)


def click_pairs(train_impressions: pd.DataFrame, index_of: dict[str, int]) -> ClickPairs:
    clicked = train_impressions[train_impressions["clicked"] == 1]
    clicked = clicked[clicked["product_id"].isin(index_of)]
    pairs = clicked[["query", "product_id"]].drop_duplicates().sort_values(["query", "product_id"])
    if pairs.empty:
        raise DataError("no clicked (query, product) pair in the training days: nothing to learn")
    queries = sorted(pairs["query"].unique())
    query_index = {q: i for i, q in enumerate(queries)}
    return ClickPairs(
        queries=queries,
        query=pairs["query"].map(query_index).to_numpy(np.int64),
        product=pairs["product_id"].map(index_of).to_numpy(np.int64),
    )


def leave_one_out_texts(
    product_ids: list[str],
    titles: list[str],
    hot: dict[str, list[str]],
    rows: np.ndarray,
    queries: list[str],
    sep: str,
    cold: np.ndarray | None = None,
) -> list[str]:
    """Product-side texts of training pairs (catalogue row, query): each product's title and hot
    queries without the pair's own query (finetune.py's module doc says why); the `cold` pairs'
    titles alone, as a product with no clicks yet reads."""
    texts = []
    if cold is None:
        cold = np.zeros(len(rows), dtype=bool)
    for row, query, no_hot in zip(rows, queries, cold, strict=True):
        others = [] if no_hot else [h for h in hot.get(product_ids[row], []) if h != query]
        texts.append(product_text(titles[row], others, sep))
    return texts
