"""CE-BERT model: the MPM loss, masked patches, checkpoints and BERT initialisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from components.errors import AceError
from components.models.modeling import (
    CeBertConfig,
    CeBertForPreTraining,
    CeBertModel,
    init_text_encoder_from,
)

VOCAB, TEXT, PATCH_DIM, PIXEL_DIM = 50, 10, 24, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> CeBertConfig:
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TEXT + 4 + 1 + 9,
        patch_dim=PATCH_DIM,
        n_patches=4,
        pixel_dim=PIXEL_DIM,
        n_pixel_tokens=9,
        max_text_len=TEXT,
        text_positions=TEXT,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return CeBertConfig(**{**sizes, **overrides})


def _batch(batch: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, TEXT), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "patch_features": torch.rand(batch, 4, PATCH_DIM, generator=g) * 3,
        "pixel_values": torch.randint(0, 256, (batch, 9, PIXEL_DIM), generator=g).to(torch.uint8),
        "patch_mask": torch.rand(batch, 4, generator=g) < 0.5,
        "mlm_labels": torch.where(torch.rand(batch, TEXT, generator=g) < 0.3, ids, -100),
        "tip_labels": torch.tensor([1, 0, 0, 0, 1, 0][:batch]),
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mpm_loss_is_kl_of_raw_to_predicted_over_masked_patches_of_matched_pairs():
    torch.manual_seed(0)
    model = CeBertForPreTraining(_config()).eval()
    batch = _batch()
    batch["patch_mask"][:, 0] = True  # every row has a masked patch, matched or not
    with torch.no_grad():
        out = model(**batch)
    raw = batch["patch_features"].numpy().astype(np.float64)
    predicted = out.mpm_logits.numpy().astype(np.float64)
    chosen = batch["patch_mask"].numpy() & batch["tip_labels"].numpy().astype(bool)[:, None]
    p, q = _softmax(raw[chosen]), _softmax(predicted[chosen])
    expected = (p * np.log(p / q)).sum(-1).mean()  # KL(p || q), softmax over the feature axis
    assert out.mpm_loss.item() == pytest.approx(expected, rel=1e-5)
    reversed_kl = (q * np.log(q / p)).sum(-1).mean()
    assert abs(reversed_kl - expected) > 1e-4  # the test can tell the direction apart
    everyone = (p_all := _softmax(raw[batch["patch_mask"].numpy()])) * np.log(
        p_all / _softmax(predicted[batch["patch_mask"].numpy()])
    )
    assert abs(everyone.sum(-1).mean() - expected) > 1e-4  # mismatched rows are left out


def test_masked_patches_enter_as_the_mean_feature_after_standardisation():
    torch.manual_seed(0)
    model = CeBertForPreTraining(_config()).eval()
    mean, std = torch.rand(PATCH_DIM) * 2, torch.rand(PATCH_DIM) + 0.5
    model.ce_bert.set_patch_statistics(mean, std)
    batch = _batch()
    mask = batch["patch_mask"].unsqueeze(-1)
    zeroed = torch.where(mask, mean.expand_as(batch["patch_features"]), batch["patch_features"])
    with torch.no_grad():
        masked = model.ce_bert(
            batch["input_ids"],
            batch["attention_mask"],
            batch["patch_features"],
            batch["pixel_values"],
            batch["patch_mask"],
        )[0]
        by_hand = model.ce_bert(
            batch["input_ids"], batch["attention_mask"], zeroed, batch["pixel_values"]
        )[0]
        unmasked = model.ce_bert(
            batch["input_ids"],
            batch["attention_mask"],
            batch["patch_features"],
            batch["pixel_values"],
        )[0]
    torch.testing.assert_close(masked, by_hand)
    assert not torch.allclose(masked, unmasked)
    assert masked.shape[1] == TEXT + 4 + 1 + 9  # text, patches, [SEP], pixels


def test_patch_standardisation_is_part_of_the_model():
    torch.manual_seed(0)
    model = CeBertForPreTraining(_config()).eval()
    batch = _batch()
    feats, text = batch["patch_features"], (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        plain = model.ce_bert(*text, feats, batch["pixel_values"])[0]
        by_hand = model.ce_bert(*text, (feats - 1.5) / 2.0, batch["pixel_values"])[0]
        model.ce_bert.set_patch_statistics(
            torch.full((PATCH_DIM,), 1.5), torch.full((PATCH_DIM,), 2.0)
        )
        standardised = model.ce_bert(*text, feats, batch["pixel_values"])[0]
    assert not torch.allclose(plain, standardised)
    torch.testing.assert_close(standardised, by_hand)
    assert {"ce_bert.patch_mean", "ce_bert.patch_std"} <= set(model.state_dict())


def test_image_tokens_keep_their_positions_whatever_the_text_length():
    torch.manual_seed(0)
    model = CeBertModel(_config()).eval()
    batch = _batch()
    short = TEXT - 4  # the same titles, 4 [PAD] fewer: image tokens must not move
    ids = batch["input_ids"].clone()
    ids[:, short - 1] = 3
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[:, short:], mask[:, short:] = 0, 0
    with torch.no_grad():
        long_out = model(padded, mask, batch["patch_features"], batch["pixel_values"])[0]
        short_out = model(
            ids[:, :short], mask[:, :short], batch["patch_features"], batch["pixel_values"]
        )[0]
    torch.testing.assert_close(long_out[:, TEXT:], short_out[:, short:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(long_out[:, :short], short_out[:, :short], rtol=1e-5, atol=1e-5)
    with pytest.raises(AceError, match="text_positions"):
        model(torch.ones(1, TEXT + 1, dtype=torch.long), torch.ones(1, TEXT + 1, dtype=torch.long))


def test_mlm_logits_are_decoded_at_labelled_positions_of_matched_rows_only():
    torch.manual_seed(0)
    model = CeBertForPreTraining(_config()).eval()
    batch = _batch()
    with torch.no_grad():
        out = model(**batch)
        full = model(**{k: v for k, v in batch.items() if k != "mlm_labels"}).mlm_logits
    chosen = (batch["mlm_labels"] != -100) & batch["tip_labels"].bool()[:, None]
    assert full.shape == (6, TEXT, VOCAB)
    torch.testing.assert_close(out.mlm_logits, full[chosen])
    expected = torch.nn.functional.cross_entropy(full[chosen], batch["mlm_labels"][chosen])
    assert out.mlm_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_save_and_load_round_trip_is_strict_and_exact(tmp_path: Path):
    torch.manual_seed(0)
    model = CeBertForPreTraining(_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded, info = CeBertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    loaded.eval()
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch = _batch()
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    # Equal weights; outputs may differ in the last bit because from_pretrained memory-maps
    # the tensors at 16-byte alignment, which changes the SIMD summation order.
    for name in ("loss", "mlm_logits", "mpm_logits", "tip_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-7)
    differ = {k for k, v in model.config.to_dict().items() if loaded.config.to_dict().get(k) != v}
    assert differ <= {"_name_or_path"}

    # Fine-tuning loads the encoder alone from the pre-training checkpoint: nothing missing.
    encoder, info = CeBertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    encoder.eval()
    keys = ("input_ids", "attention_mask", "patch_features", "pixel_values")
    with torch.no_grad():
        ours = model.ce_bert(*(batch[k] for k in keys))[0]
        theirs = encoder(*(batch[k] for k in keys))[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_text_only_model_reads_no_image_and_refuses_one():
    model = CeBertForPreTraining(_config(use_patches=False, use_pixels=False)).eval()
    assert model.mpm_head is None and model.ce_bert.patch_proj is None
    assert model.config.n_image_tokens == 0
    batch = _batch()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], mlm_labels=batch["mlm_labels"])
    assert out.mpm_loss is None and out.tip_loss is None
    assert out.loss.item() == pytest.approx(out.mlm_loss.item())
    with pytest.raises(AceError, match="use_patches=False"):
        model(batch["input_ids"], batch["attention_mask"], batch["patch_features"])


def test_init_from_bert_copies_weights_truncates_layers_and_grows_segments(tmp_path: Path):
    torch.manual_seed(1)
    bert_cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    source = BertModel(bert_cfg)
    with torch.no_grad():  # distinct segment rows, so growing can be told from copying
        source.embeddings.token_type_embeddings.weight.normal_()
    source.save_pretrained(tmp_path / "bert")
    model = CeBertForPreTraining(_config(max_position_embeddings=64))
    unused = init_text_encoder_from(model, tmp_path / "bert")

    ours, theirs = model.ce_bert.bert.state_dict(), source.state_dict()
    assert len(model.ce_bert.bert.encoder.layer) == 2
    assert unused and all(".layer.2." in key for key in unused)
    for key in (
        "embeddings.word_embeddings.weight",
        "encoder.layer.1.output.dense.weight",
        "embeddings.position_embeddings.weight",
        "pooler.dense.weight",
    ):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    segments = ours["embeddings.token_type_embeddings.weight"]
    source_segments = theirs["embeddings.token_type_embeddings.weight"]
    assert segments.shape[0] == 3
    torch.testing.assert_close(segments[:2], source_segments)
    torch.testing.assert_close(segments[2], source_segments[1])

    wider = CeBertForPreTraining(_config(hidden_size=48, num_attention_heads=2))
    with pytest.raises(AceError, match="build the config from the checkpoint"):
        init_text_encoder_from(wider, tmp_path / "bert")


def test_tip_match_adds_a_bilinear_term_of_the_text_and_image_means():
    torch.manual_seed(0)
    paper = CeBertForPreTraining(_config(tip_pooling="cls")).eval()
    assert paper.tip_match is None
    model = CeBertForPreTraining(_config(tip_pooling="match")).eval()
    model.load_state_dict(paper.state_dict(), strict=False)  # the same encoder and [CLS] head
    batch = _batch()
    with torch.no_grad():
        with_match = model(**batch).tip_logits
        cls_only = paper(**batch).tip_logits
        sequence, _ = model.ce_bert(
            batch["input_ids"],
            batch["attention_mask"],
            batch["patch_features"],
            batch["pixel_values"],
            batch["patch_mask"],
        )
        text = sequence[:, :TEXT].mean(1)  # every text token is real in this batch
        image = sequence[:, TEXT:].mean(1)
        bilinear = torch.einsum("bi,ij,bj->b", text, model.tip_match.weight[0], image)
    torch.testing.assert_close(with_match, cls_only + bilinear, rtol=1e-5, atol=1e-5)
