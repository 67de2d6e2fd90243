"""CE-BERT pre-training: vocabulary, masking, pairs, resumable training, held-out metrics."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import BertConfig, BertModel, BertTokenizerFast

from components.config import FeaturesConfig
from components.features.features import FeatureStore, build_features
from components.models.modeling import CeBertModel
from components.models.tokenizer import SPECIAL_TOKENS, train_wordpiece
from components.retrieval.retrieval import encode_texts
from components.training import pretrain as pt
from components.training.pretrain import (
    PairDataset,
    build_model,
    mask_tokens,
    pretrain,
    split_products,
    training_texts,
)
from tests.conftest import make_params

N_PRODUCTS = 40
TINY = {  # a model that trains in well under a second per dozen steps on CPU
    "profile": "small",
    "pretrain.vocab_size": 400,
    "pretrain.hidden_size": 32,
    "pretrain.num_layers": 1,
    "pretrain.num_heads": 2,
    "pretrain.intermediate_size": 64,
    "pretrain.max_text_len": 24,
    "pretrain.batch_size": 16,
    "pretrain.learning_rate": 5e-3,
    "pretrain.warmup_steps": 2,
    "pretrain.eval_share": 0.2,
    "pretrain.checkpoint_every": 3,
    "pretrain.device": "cpu",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Validated tables and a feature store (both variants) for the first 40 tiny products."""
    artifacts = tmp_path_factory.mktemp("pretrain_artifacts")
    products = pd.read_parquet(tiny_world / "products.parquet").head(N_PRODUCTS)
    impressions = pd.read_parquet(tiny_world / "impressions.parquet")
    (artifacts / "validate").mkdir()
    products.to_parquet(artifacts / "validate" / "products.parquet", index=False)
    impressions.to_parquet(artifacts / "validate" / "impressions.parquet", index=False)
    cfg = FeaturesConfig(patch_input=32, variants=("roi", "full"), samples_logged=0, device="cpu")
    build_features(products, tiny_world, artifacts / "features", cfg, progress=False)
    return artifacts


_params = partial(make_params, ({"synth.scale": "tiny", "model.variant": "cebert", **TINY},))


@pytest.fixture(scope="module")
def tokenizer(tiny_world: Path):
    products = pd.read_parquet(tiny_world / "products.parquet")
    impressions = pd.read_parquet(tiny_world / "impressions.parquet")
    return train_wordpiece(
        training_texts(products, impressions[impressions.day < impressions.day.max()]), 400
    )


# ------------------------------------------------------------------------------ vocabulary


def test_vocabulary_is_deterministic_and_keeps_bert_special_ids(tiny_world: Path, tokenizer):
    products = pd.read_parquet(tiny_world / "products.parquet")
    impressions = pd.read_parquet(tiny_world / "impressions.parquet")
    again = train_wordpiece(
        training_texts(products, impressions[impressions.day < impressions.day.max()]), 400
    )
    assert again.get_vocab() == tokenizer.get_vocab()
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert 100 < len(tokenizer) <= 400
    ids = tokenizer("Red  STRIPED shirt")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.tokenize("Red STRIPED") == tokenizer.tokenize("red striped")


def products_of(data_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(data_dir / "products.parquet")


# ------------------------------------------------------------------------------ masking, pairs


def test_bert_masking_statistics(tiny_world: Path, tokenizer):
    titles = list(products_of(tiny_world).title) * 5
    ids = encode_texts(tokenizer, titles, 24)
    special = np.array(sorted(tokenizer.all_special_ids))
    ordinary = np.setdiff1d(np.arange(len(tokenizer)), special)
    rng = np.random.default_rng(0)
    inputs, labels = mask_tokens(ids, rng, 0.15, special, tokenizer.mask_token_id, ordinary)

    eligible = ~np.isin(ids, special)
    chosen = labels != -100
    assert not (chosen & ~eligible).any()  # [CLS], [SEP], [PAD] are never chosen ...
    assert (inputs[~eligible] == ids[~eligible]).all()  # ... nor changed
    assert (labels[chosen] == ids[chosen]).all()
    assert chosen.any(1).all()  # at least one per title
    # Each token with p = 0.15, plus one forced pick in titles where none came up.
    n = eligible.sum(1)
    expected = (0.15 * n + 0.85**n).sum() / n.sum()
    assert abs(chosen.sum() / n.sum() - expected) < 0.006
    assert 0.15 < expected < 0.17

    to_mask = (inputs == tokenizer.mask_token_id) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~to_mask & ~kept
    total = chosen.sum()
    assert abs(to_mask.sum() / total - 0.8) < 0.02
    assert abs(replaced.sum() / total - 0.1) < 0.015  # random tokens (a few equal the original)
    assert abs(kept.sum() / total - 0.1) < 0.015
    assert np.isin(inputs[replaced], ordinary).all()  # replacements are ordinary tokens


def _dataset(world: Path, tokenizer, variant: str, negatives: int = 3) -> PairDataset:
    params = _params(
        world, world, **{"model.variant": variant, "pretrain.tip_negatives": negatives}
    )
    store = FeatureStore(world / "features")
    ids = sorted(store.row_of)
    titles = pd.read_parquet(world / "validate" / "products.parquet").set_index("product_id")
    return pt._dataset(ids, titles.title, store, params.model, tokenizer, params.pretrain)


def test_tip_pairs_are_one_matched_to_three_mismatched(world: Path, tokenizer):
    data = _dataset(world, tokenizer, "cebert")
    pairs = data.pairs(np.random.default_rng([13, 0]))
    assert len(pairs) == 4 * N_PRODUCTS
    assert (pairs.labels == 1).sum() * 3 == (pairs.labels == 0).sum()
    matched = pairs.labels == 1
    assert (pairs.titles[matched] == pairs.images[matched]).all()
    assert np.array_equal(np.sort(pairs.titles[matched]), np.arange(N_PRODUCTS))
    assert (pairs.titles[~matched] != pairs.images[~matched]).all()
    for product in range(N_PRODUCTS):  # 3 distinct other images per title
        others = pairs.images[~matched & (pairs.titles == product)]
        assert len(others) == 3 and len(set(others)) == 3
    again = data.pairs(np.random.default_rng([13, 0]))
    assert np.array_equal(again.images, pairs.images)
    other_epoch = data.pairs(np.random.default_rng([13, 1]))
    assert not np.array_equal(other_epoch.images, pairs.images)
    assert pairs.labels[:40].sum() < 40  # shuffled, not grouped by label


def test_batches_read_the_variant_image_tokens(world: Path, tokenizer):
    store = FeatureStore(world / "features")
    rng = np.random.default_rng(0)
    ce = _dataset(world, tokenizer, "cebert")
    pairs = ce.pairs(rng).slice(0, 8)
    batch = ce.collate(pairs, rng)
    rows = ce.store_rows[pairs.images]
    np.testing.assert_array_equal(batch["patch_features"].numpy(), store.patches("roi")[rows])
    np.testing.assert_array_equal(batch["pixel_values"].numpy(), store.pixels()[rows])
    assert batch["patch_features"].dtype == torch.float32
    assert batch["input_ids"].shape == (8, 24) and batch["patch_mask"].shape == (8, 16)
    assert batch["patch_mask"].any(1).all()
    assert abs(batch["patch_mask"].float().mean().item() - 0.15) < 0.1

    fashion = _dataset(world, tokenizer, "fashionbert")
    batch = fashion.collate(pairs, rng)
    np.testing.assert_array_equal(batch["patch_features"].numpy(), store.patches("full")[rows])
    assert "pixel_values" not in batch

    twin = _dataset(world, tokenizer, "twinbert")
    pairs = twin.pairs(rng)
    assert len(pairs) == N_PRODUCTS and twin.negatives == 0 and not twin.tip
    assert set(twin.collate(pairs.slice(0, 4), rng)) == {
        "input_ids",
        "attention_mask",
        "mlm_labels",
    }


def test_held_out_products_are_a_seeded_share():
    ids = [f"p{i:03d}" for i in range(100)]
    train, held = split_products(ids[::-1], 0.1, seed=5)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100
    assert split_products(ids, 0.1, seed=5) == (train, held)
    assert split_products(ids, 0.1, seed=6)[1] != held


def test_build_model_sizes_from_params_store_and_tokenizer(world: Path, tokenizer):
    params = _params(world, world)
    store = FeatureStore(world / "features")
    model = build_model(params.pretrain, params.model, store.manifest, tokenizer)
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.sep_token_id == tokenizer.sep_token_id and cfg.pad_token_id == tokenizer.pad_token_id
    assert (cfg.patch_dim, cfg.n_patches, cfg.pixel_dim, cfg.n_pixel_tokens) == (1280, 16, 3072, 49)
    assert cfg.max_position_embeddings == params.pretrain.text_positions + 16 + 1 + 49
    assert cfg.hidden_size == 32 and cfg.num_hidden_layers == 1

    fashion = _params(world, world, **{"model.variant": "fashionbert"})
    model = build_model(fashion.pretrain, fashion.model, store.manifest, tokenizer)
    assert model.config.patch_source == "full" and not model.config.use_pixels


def test_build_model_from_a_bert_checkpoint(world: Path, tokenizer, tmp_path: Path):
    torch.manual_seed(0)
    source = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=128,
        )
    )
    source.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    params = _params(
        world, world, **{"pretrain.init_from": str(tmp_path / "bert"), "pretrain.num_layers": 2}
    )
    model = build_model(
        params.pretrain, params.model, FeatureStore(world / "features").manifest, tokenizer
    )
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (48, 4, 96)
    # Image tokens sit after text_positions (128): the table grows past the checkpoint's 128.
    assert cfg.num_hidden_layers == 2 and cfg.max_position_embeddings == 128 + 16 + 1 + 49
    torch.testing.assert_close(
        model.ce_bert.bert.embeddings.position_embeddings.weight[:128],
        source.embeddings.position_embeddings.weight,
    )
    torch.testing.assert_close(
        model.ce_bert.bert.embeddings.word_embeddings.weight,
        source.embeddings.word_embeddings.weight,
    )
    # pretrain() then uses the checkpoint's tokenizer, not a vocabulary of its own.
    run = _params(
        world,
        world,
        **{"pretrain.init_from": str(tmp_path / "bert"), "pretrain.max_steps": 2},
    )
    pretrain(run, tmp_path / "out", progress=False)
    trained = CeBertModel.from_pretrained(tmp_path / "out" / pt.MODEL_DIR)
    assert trained.config.hidden_size == 48 and trained.config.num_hidden_layers == 1
    saved = BertTokenizerFast.from_pretrained(tmp_path / "out" / pt.MODEL_DIR)
    assert saved.get_vocab() == tokenizer.get_vocab()


# ------------------------------------------------------------------------------ training


def test_resumed_run_continues_the_same_loss_trajectory(
    world: Path, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    params = _params(world, tiny_world, **{"pretrain.max_steps": 8})
    whole = pretrain(params, tmp_path / "whole", progress=False)
    reference = json.loads((tmp_path / "whole" / pt.HISTORY).read_text())

    class Killed(Exception):
        pass

    seen: list[tuple[int, float]] = []

    def log_then_die_at_7(step: int, record: dict[str, float]) -> None:
        seen.append((step, record["loss"]))
        if step == 7:
            raise Killed

    monkeypatch.setattr(pt, "log_step", log_then_die_at_7)
    with pytest.raises(Killed):
        pretrain(params, tmp_path / "resumed", progress=False)
    checkpoints = sorted((tmp_path / "resumed.work" / pt.CHECKPOINTS_DIR).glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-0000006"]  # only the last one kept

    seen.clear()
    monkeypatch.setattr(pt, "log_step", lambda step, record: seen.append((step, record["loss"])))
    resumed = pretrain(params, tmp_path / "resumed", progress=False)
    assert [s for s, _ in seen] == [7, 8]  # steps 1-6 were not redone
    assert [loss for _, loss in seen] == [h["loss"] for h in reference[6:]]
    assert json.loads((tmp_path / "resumed" / pt.HISTORY).read_text()) == reference
    for key in ("eval_mlm_accuracy", "eval_mpm_loss", "eval_tip_auc", "final_loss"):
        assert resumed[key] == whole[key]
    assert not (tmp_path / "resumed.work" / pt.CHECKPOINTS_DIR).exists()

    # A checkpoint of other settings is not resumed from.
    other = _params(world, tiny_world, **{"pretrain.max_steps": 8, "pretrain.dropout": 0.2})
    monkeypatch.setattr(pt, "log_step", log_then_die_at_7)
    with pytest.raises(Killed):
        pretrain(params, tmp_path / "switched", progress=False)
    seen.clear()
    monkeypatch.setattr(pt, "log_step", lambda step, record: seen.append((step, record["loss"])))
    pretrain(other, tmp_path / "switched", progress=False)
    assert seen[0][0] == 1


def test_tiny_run_learns_and_writes_a_loadable_model(world: Path, tiny_world: Path, tmp_path: Path):
    # No validation day: the 400-token vocabulary then holds the three training days' queries,
    # with which these 40 products' held-out titles are learnable in 12 epochs (with two days'
    # queries the held-out MLM stays near chance, ln 400, in this toy).
    overrides = {"pretrain.epochs": 12, "pretrain.checkpoint_every": 50, "split.val_days": 0}
    params = _params(world, tiny_world, **overrides)
    mlflow.set_experiment("pretrain-test")
    with mlflow.start_run() as run:
        metrics = pretrain(params, tmp_path / "out", progress=False)
    history = json.loads((tmp_path / "out" / pt.HISTORY).read_text())
    steps = len(history)
    assert steps == metrics["steps"] == 12 * 32 * 4 / 16  # 32 training products x 4 pairs
    for key in ("loss", "mlm_loss", "tip_loss"):
        first = np.mean([h[key] for h in history[:8]])
        last = np.mean([h[key] for h in history[-8:]])
        assert last < first - 0.05, key
    assert metrics["eval_tip_majority_baseline"] == 0.75
    assert metrics["n_eval_products"] == 8 and metrics["samples_per_second"] > 0

    # Held-out MLM and MPM beat the same model untrained (same seed, same held-out pairs).
    # (Measured 5.56 vs 5.98 and 0.027 vs 0.049; 8 held-out products are too few for TIP AUC.)
    model_dir = tmp_path / "out" / pt.MODEL_DIR
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    store = FeatureStore(world / "features")
    products = pd.read_parquet(world / "validate" / "products.parquet")
    _, held = split_products(list(products.product_id), 0.2, params.pretrain.seed)
    titles = products.set_index("product_id").title
    held_set = pt._dataset(held, titles, store, params.model, tokenizer, params.pretrain)
    torch.manual_seed(params.pretrain.seed)
    untrained = build_model(params.pretrain, params.model, store.manifest, tokenizer)
    before = pt.evaluate(untrained, held_set, params.pretrain, torch.device("cpu"))
    assert metrics["eval_mlm_loss"] < before["eval_mlm_loss"] - 0.2
    assert metrics["eval_mpm_loss"] < 0.8 * before["eval_mpm_loss"]

    client = MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == steps
    assert len(client.get_metric_history(run.info.run_id, "train/tip_loss")) == steps
    assert (tmp_path / "out" / pt.CURVE).stat().st_size > 1000  # the stage logs it to MLflow

    summary = json.loads((model_dir / pt.SUMMARY).read_text())
    assert summary["tasks"] == ["mlm", "mpm", "tip"]
    encoder, info = CeBertModel.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and encoder.config.use_pixels
    assert (model_dir / "tokenizer.json").exists()


def test_twinbert_pretrains_mlm_only(world: Path, tiny_world: Path, tmp_path: Path):
    params = _params(world, tiny_world, **{"model.variant": "twinbert", "pretrain.max_steps": 4})
    metrics = pretrain(params, tmp_path / "twin", progress=False)
    assert "eval_tip_auc" not in metrics and "eval_mpm_loss" not in metrics
    assert "final_mlm_loss" in metrics and "final_tip_loss" not in metrics
    summary = json.loads((tmp_path / "twin" / pt.MODEL_DIR / pt.SUMMARY).read_text())
    assert summary["tasks"] == ["mlm"] and "MLM only" in summary["note"]
    history = json.loads((tmp_path / "twin" / pt.HISTORY).read_text())
    assert all(h["loss"] == h["mlm_loss"] and "tip_loss" not in h for h in history)


def test_a_variant_with_the_same_image_inputs_reuses_the_finished_run(
    world: Path, tiny_world: Path, tmp_path: Path
):
    first = pretrain(_params(world, tiny_world, **{"pretrain.max_steps": 3}), tmp_path / "a")
    # acebert reads what cebert reads: the same pre-training, copied instead of redone.
    ace = _params(world, tiny_world, **{"pretrain.max_steps": 3, "model.variant": "acebert"})
    again = pretrain(ace, tmp_path / "b", work_dir=tmp_path / "a.work")
    assert again["reused"] == 1.0 and "reused" not in first
    assert again["eval_mlm_loss"] == first["eval_mlm_loss"]
    weights = "model/model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    # FashionBERT reads other patches: trained, not reused.
    fashion = _params(
        world, tiny_world, **{"pretrain.max_steps": 3, "model.variant": "fashionbert"}
    )
    assert "reused" not in pretrain(fashion, tmp_path / "c", work_dir=tmp_path / "a.work")
