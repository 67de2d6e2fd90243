"""Behaviour of a trained model (CheckList's invariance and directional tests), on the tiny world.

The model is the default one at a small size: CE-BERT from the packaged all-MiniLM-L6-v2 (two
layers), fine-tuned as `acebert`. The world's hidden truth (each product's real colour) is read
here to judge the rankings, never by the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.data.world.vocab import CATEGORIES, COLOURS
from components.retrieval.evaluate import evaluate_retriever
from components.retrieval.retrieval import (
    PRODUCT_EMBEDDINGS,
    PRODUCT_IDS,
    embed_queries,
    load_retriever,
)
from components.training.finetune import finetune
from components.training.pretrain import pretrain
from tests.conftest import TRAINED_FEATURES, trained_params

# Trains a model first (about a minute on one thread): not in `make test-fast`.
pytestmark = pytest.mark.slow

COLOUR_NAMES = [c.name for c in COLOURS]
PRETRAINED_SMALL = {
    **TRAINED_FEATURES,
    "profile": None,  # not `small`: the pretrained backbone, as `make demo` trains it
    "pretrain.init_from": "all-MiniLM-L6-v2",
    "pretrain.num_layers": 2,
    "pretrain.max_steps": 1,
    "model.variant": "acebert",
    "finetune.embedding_dim": 32,
    "finetune.learning_rate": 1e-4,
    "finetune.epochs": 6,
    "finetune.batch_size": 32,
    "finetune.max_product_text_len": 48,
}


class Ranker:
    def __init__(self, artifacts: Path, truth: pd.DataFrame):
        self.model, self.tokenizer = load_retriever(artifacts / "finetune" / "model")
        self.products = np.load(artifacts / "evaluate" / PRODUCT_EMBEDDINGS)
        ids = json.loads((artifacts / "evaluate" / PRODUCT_IDS).read_text(encoding="utf-8"))
        self.truth = truth.set_index("product_id").loc[ids].reset_index()

    def scores(self, queries: list[str]) -> np.ndarray:
        """(queries, products) cosine similarities."""
        q = embed_queries(self.model, self.tokenizer, queries, 12, 64, torch.device("cpu"))
        return q @ self.products.T

    def top10(self, queries: list[str]) -> list[set[int]]:
        return [set(row) for row in np.argsort(-self.scores(queries), axis=1)[:, :10]]


@pytest.fixture(scope="module")
def ranker(trained_world: Path, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    artifacts = tmp_path_factory.mktemp("behaviour")
    for stage in ("validate", "features"):
        shutil.copytree(trained_world / stage, artifacts / stage)
    params = trained_params(artifacts, tiny_world, **PRETRAINED_SMALL)
    pretrain(params, artifacts / "pretrain", progress=False)
    finetune(params, artifacts / "finetune", progress=False)
    evaluate_retriever(params, artifacts / "evaluate", progress=False)
    torch.set_num_threads(threads)
    return Ranker(artifacts, pd.read_parquet(tiny_world / "truth" / "products.parquet"))


def _query(colour: str, category: str) -> str:
    return f"{colour} {category}"


def _typo(word: str) -> str:
    """Two inner characters swapped ("dress" -> "drses")."""
    return word[:1] + word[2] + word[1] + word[3:] if len(word) > 3 else word


def _kept_in_top10(ranker: Ranker, changed: list[str]) -> float:
    """Of the products in the top 10 of the query naming their own colour and category, the share
    still in the top 10 after the query is changed (one changed query per product)."""
    truth = ranker.truth
    before = ranker.top10([_query(p.color, p.category) for p in truth.itertuples()])
    after = ranker.top10(changed)
    found = [j for j in range(len(truth)) if j in before[j]]
    assert len(found) > len(truth) / 2  # most products are found by their own description
    return float(np.mean([j in after[j] for j in found]))


def _control(ranker: Ranker) -> float:
    """The same measure when the category is swapped for another one: what a change that should
    lose the product scores."""
    categories = sorted(ranker.truth.category.unique())
    other = {c: categories[(i + 5) % len(categories)] for i, c in enumerate(categories)}
    return _kept_in_top10(
        ranker, [_query(p.color, other[p.category]) for p in ranker.truth.itertuples()]
    )


def test_a_category_synonym_keeps_the_right_product_in_the_top_10(ranker: Ranker):
    """Invariance: "red gown" finds the red dresses "red dress" found; another category (the
    control) does not. Measured: 0.64 kept against 0.18."""
    truth = ranker.truth
    synonym = {c.name: c.synonyms[0] for c in CATEGORIES}
    kept = _kept_in_top10(
        ranker, [_query(p.color, synonym[p.category]) for p in truth.itertuples()]
    )
    control = _control(ranker)
    assert kept > 0.5 and kept > control + 0.25


def test_a_typo_keeps_the_right_product_more_often_than_another_category(ranker: Ranker):
    """Invariance, weaker: a typo ("drses") is new WordPiece pieces, yet the right product stays
    in the top 10 twice as often as for another category. Measured: 0.38 against 0.18."""
    truth = ranker.truth
    kept = _kept_in_top10(ranker, [_query(p.color, _typo(p.category)) for p in truth.itertuples()])
    control = _control(ranker)
    assert kept > control + 0.1


def test_the_colour_word_moves_the_ranking_toward_that_colour(ranker: Ranker):
    """Directional: a product scores higher for the query naming its real colour than for the
    same query with another colour, in most (product, colour) pairs (chance: half). Measured:
    0.69. (Colour synonyms are not learned at this size: "crimson dress" moves the top 10 as far
    from "red dress" as "blue dress" does, so no test claims it.)"""
    truth = ranker.truth
    queries = sorted({_query(c, p.category) for p in truth.itertuples() for c in COLOUR_NAMES})
    row = {q: i for i, q in enumerate(queries)}
    scores = ranker.scores(queries)
    wins = [
        scores[row[_query(p.color, p.category)], j] > scores[row[_query(other, p.category)], j]
        for j, p in enumerate(truth.itertuples())
        for other in COLOUR_NAMES
        if other != p.color
    ]
    assert np.mean(wins) > 0.6
