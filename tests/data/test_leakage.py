"""Leakage: nothing a model learns from comes from the validation or test days, and no training
pair's product text holds the pair's own query."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.config import SplitConfig
from components.data.clicklog import hot_queries, leave_one_out_texts, split_days
from components.errors import DataError
from components.models.tokenizer import train_wordpiece
from components.training.pretrain import training_texts


def test_hot_queries_come_from_training_days_only():
    rows = [  # (query, product, clicked, day)
        *[("red dress", "p1", 1, 0)] * 3,
        *[("dress", "p1", 1, 1)] * 2,
        ("blue dress", "p1", 1, 0),
        ("zebra dress", "p1", 0, 1),  # shown, never clicked
        *[("leaked query", "p1", 1, 2)] * 9,  # the test day: most clicks of all
        ("cap", "p2", 1, 2),
    ]
    impressions = pd.DataFrame(rows, columns=["query", "product_id", "clicked", "day"])
    periods = split_days(impressions, SplitConfig(test_days=1, val_days=0, train_days=0))
    train, test = periods.train, periods.test
    assert set(test.day) == {2} and set(train.day) == {0, 1}
    hot = hot_queries(train, k=2)
    assert hot == {"p1": ["red dress", "dress"]}  # by clicks; p2 was clicked only on the test day
    assert hot_queries(train, k=10)["p1"] == ["red dress", "dress", "blue dress"]
    # The split is what keeps it out: counted over the whole log it would be first.
    assert hot_queries(impressions, 10)["p1"][0] == "leaked query"
    # A training window of one day keeps only the day before the test period.
    window = split_days(impressions, SplitConfig(test_days=1, val_days=0, train_days=1))
    assert set(window.train.day) == {1} and window.test.equals(test)
    assert hot_queries(window.train, k=10) == {"p1": ["dress"]}
    # With a validation day, it is neither trained on nor tested: day 1 validates.
    validated = split_days(impressions, SplitConfig(test_days=1, val_days=1, train_days=0))
    assert set(validated.train.day) == {0} and set(validated.val.day) == {1}
    assert hot_queries(validated.train, k=10) == {"p1": ["red dress", "blue dress"]}
    with pytest.raises(DataError, match="too few"):
        split_days(impressions, SplitConfig(test_days=1, val_days=2))


def test_training_product_text_leaves_the_pairs_own_query_out():
    hot = {"p1": ["red dress", "dress", "crimson gown"], "p2": ["cap"]}
    pairs = (
        ["p1", "p2"],
        ["Red Dress", "Blue Cap"],
        hot,
        np.array([0, 0, 1]),
        ["dress", "summer dress", "cap"],
        "[SEP]",
    )
    texts = leave_one_out_texts(*pairs)
    assert texts == [
        "Red Dress [SEP] red dress [SEP] crimson gown",  # "dress" was this pair's query
        "Red Dress [SEP] red dress [SEP] dress [SEP] crimson gown",  # not a hot query: all kept
        "Blue Cap",
    ]
    cold = leave_one_out_texts(*pairs, np.array([False, True, False]))
    assert cold == [texts[0], "Red Dress", "Blue Cap"]  # the cold pair reads its title alone


def test_vocabulary_never_sees_validation_or_test_day_queries(tiny_world: Path):
    products = pd.DataFrame({"product_id": ["a", "b"], "title": ["red chair", "blue shirt"]})
    impressions = pd.DataFrame(
        {"query": ["quokka lamp", "red chair", "okapi rug", "zanzibar sofa"], "day": [0, 1, 2, 3]}
    )
    split = SplitConfig(test_days=1, val_days=1, train_days=0)
    texts = training_texts(products, split_days(impressions, split).train)
    assert "quokka lamp" in texts and "okapi rug" not in texts and "zanzibar sofa" not in texts
    vocab = train_wordpiece(texts, 200).get_vocab()
    assert "quokka" in vocab and "okapi" not in vocab and "zanzibar" not in vocab

    # On the tiny world, with room for every word: words first searched on the validation or
    # test days (typos) stay out.
    products = pd.read_parquet(tiny_world / "products.parquet")
    impressions = pd.read_parquet(tiny_world / "impressions.parquet")
    periods = split_days(impressions, split)

    def words(texts) -> set[str]:
        return {w for t in texts for w in t.lower().split() if w.isalnum()}

    seen = words(training_texts(products, periods.train))
    late = pd.concat([periods.val, periods.test])["query"]
    only_late = words(late) - seen
    assert only_late, "the tiny world should have words only searched late (typos)"
    vocab = set(train_wordpiece(training_texts(products, periods.train), 8000).get_vocab())
    assert seen <= vocab and not only_late & vocab
    # The control: had the later days been trained on, their words would be tokens.
    leaky = train_wordpiece(training_texts(products, impressions), 8000)
    assert only_late <= set(leaky.get_vocab())
