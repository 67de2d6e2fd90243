"""MAKE's ideas as variants: keywords from training clicks only, the per-product modality gate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from components.config import MakeConfig
from components.models.keywords import query_keywords, targets
from components.models.modeling import AceBertForRetrieval, CeBertConfig


def test_keywords_are_what_the_clicked_titles_share_beyond_boilerplate():
    titles = {
        "a": "Red Silk Dress Free Shipping",
        "b": "Crimson red dress free shipping",
        "c": "Blue Cotton Shirt Free Shipping",
        "d": "Green Wool Shirt",
    }
    clicks = pd.DataFrame(
        {
            "query": ["crimson gown", "crimson gown", "crimson gown", "shirt", "shirt"],
            "product_id": ["a", "b", "c", "c", "d"],
            "clicked": [1, 1, 0, 1, 1],
        }
    )
    cfg = MakeConfig(keywords_per_query=2, keyword_min_share=0.6)
    vocabulary, keywords = query_keywords(clicks, titles, cfg)
    named = {q: [vocabulary[i] for i in kw] for q, kw in keywords.items()}
    # red and dress are in both clicked titles ("crimson", "silk" in one) and rarer than
    # "free"/"shipping" (in 3 of the 4 titles).
    assert named["crimson gown"] == ["dress", "red"]
    assert named["shirt"] == ["shirt"]  # the only word both clicked shirts share
    assert "blue" not in named["crimson gown"]  # shown, never clicked
    multi_hot = targets(["shirt", "unknown"], keywords, len(vocabulary))
    assert multi_hot[0].sum() == 1 and multi_hot[1].sum() == 0


def _model(modal: bool, keywords: int = 0) -> AceBertForRetrieval:
    torch.manual_seed(0)
    config = CeBertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        patch_dim=8,
        pixel_dim=12,
        n_pixel_tokens=4,
        n_patches=4,
        max_position_embeddings=64,
        text_positions=32,
        embedding_dim=8,
        modal_adaptation=modal,
        n_keywords=keywords,
    )
    return AceBertForRetrieval(config).eval()


def _products(n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(5, 50, (n, 6), generator=g),
        "attention_mask": torch.ones(n, 6, dtype=torch.long),
        "patch_features": torch.randn(n, 4, 8, generator=g),
        "pixel_values": torch.randint(0, 255, (n, 4, 12), generator=g, dtype=torch.uint8),
    }


def test_modality_gate_mixes_each_products_text_and_image_means():
    model = _model(modal=True)
    inputs = _products()
    weights = model.modality_weights(**inputs)
    assert weights.shape == (3, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    sequence, _ = model.ce_bert(**inputs)
    text, image = sequence[:, :6].mean(1), sequence[:, 6:].mean(1)
    pooled, _ = model.pool_product(sequence, inputs["attention_mask"])
    torch.testing.assert_close(pooled, weights[:, :1] * text + weights[:, 1:] * image)
    # A gate that trusts only the image pools the image tokens alone.
    with torch.no_grad():
        model.modality_gate[-1].bias.copy_(torch.tensor([-50.0, 50.0]))
    pooled, weights = model.pool_product(sequence, inputs["attention_mask"])
    torch.testing.assert_close(pooled, image)
    assert weights[:, 1].min() > 0.999
    # Without modal adaptation every real token counts alike, and there are no weights.
    plain = _model(modal=False)
    assert plain.modality_weights(**inputs) is None


def test_keyword_loss_counts_only_queries_with_keywords():
    model = _model(modal=False, keywords=5)
    queries = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    goal = torch.zeros(4, 5)
    goal[0, 1] = goal[2, 3] = 1.0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        model.keyword_head(queries[[0, 2]]), goal[[0, 2]]
    )
    assert model.keyword_loss(queries, goal).item() == pytest.approx(expected.item())
    assert model.keyword_loss(queries, torch.zeros(4, 5)).item() == 0.0
    assert np.isfinite(model.keyword_loss(queries, goal).item())


def test_text_pooling_reads_the_text_tokens_whose_states_see_the_image():
    model = _model(modal=False)
    model.config.product_pooling = "text"
    inputs = _products()
    sequence, _ = model.ce_bert(**inputs)
    pooled, weights = model.pool_product(sequence, inputs["attention_mask"])
    torch.testing.assert_close(pooled, sequence[:, :6].mean(1))
    assert weights is None
    # The image still counts: through attention, other pixels change the text tokens' states.
    other = dict(inputs, pixel_values=255 - inputs["pixel_values"])
    assert not torch.allclose(model.encode_products(**inputs), model.encode_products(**other))
