"""CE-BERT pre-training (paper 2.2, 4.1, 4.4.1): MLM, MPM and TIP, jointly on each mini-batch.

Where the paper is vague, this is what we chose:

- Pairs (4.1: positives to random negatives 1:3). Every epoch each training product gives one
  matched pair (its title, its own image tokens; TIP label 1) and `tip_negatives` mismatched pairs
  (its title with the image tokens of that many *distinct other* products drawn uniformly from the
  training products, any category; label 0). Negatives are redrawn every epoch.
- MLM and MPM losses count only matched pairs (modeling.CeBertForPreTraining): a mismatched image
  cannot help rebuild the title nor the title the image. Their *inputs* are masked on every pair
  alike, so a [MASK] or a zeroed patch never tells the TIP head which pairs are matched.
- MLM masking is BERT's: 15% (`mlm_probability`) of the title's non-special tokens are chosen
  independently, at least one per title; of those 80% become [MASK], 10% a random non-special
  token, 10% stay; labels are -100 everywhere else.
- MPM masks `mpm_probability` of the patch tokens (independently, at least one per image); the
  model zeroes them and scores KL(p || q) of the softmaxed raw vs. predicted features (the KL
  direction and softmax axis are modeling.mpm_kl's). Pixel tokens are never masked: the paper
  masks "text tokens and image patches" and has the whole image's pixels inform the patches.
- Titles are cut at `max_text_len` tokens and each batch is padded only to its longest title:
  image tokens are numbered from a fixed offset (modeling.py), so padding changes nothing.
- Patch features are standardised inside the model with the mean and standard deviation of the
  training products' patches (held-out products do not contribute).
- TwinBERT reads no image: without an image there is no TIP and no MPM, so it trains MLM alone.
- Held-out products (a seeded `eval_share`, at least 2) never train; their pairs (negatives drawn
  among themselves, masked as in training, dropout off) give the final MLM accuracy, MPM loss
  and TIP AUC / accuracy, the latter against the majority baseline k / (k + 1), k negatives.
- Optimiser: AdamW (the paper says Adam; BERT's is Adam with decoupled weight decay), no decay
  on biases and LayerNorms, linear warm-up then linear decay to zero (BERT's schedule).
- The vocabulary is our own WordPiece (components/models/tokenizer.py) over every catalogue title
and the
  queries of the training days only, or, with `init_from`, the checkpoint's.

Every random draw is a function of (seed, epoch, step): the epoch's pairs and order, each batch's
masks, the dropout of each step. A checkpoint therefore needs only the weights, the optimiser and
scheduler state and the step; a run killed and restarted resumes at its last checkpoint and
computes the same losses as an uninterrupted run (on the same device and thread count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from transformers import BertConfig, BertTokenizerFast

from components.config import ModelConfig, Params, PretrainConfig
from components.data.clicklog import split_days, validated_table
from components.errors import AceError, DataError
from components.features.backbones import resolve_device
from components.features.features import FeatureStore
from components.models import pretrained
from components.models.modeling import (
    CeBertConfig,
    CeBertForPreTraining,
    init_text_encoder_from,
    is_new_layer,
    mpm_kl,
)
from components.models.tokenizer import train_wordpiece
from components.ops.plots import plot_history
from components.retrieval.retrieval import encode_texts
from components.training import checkpoints, distributed
from components.training.trainer import Schedule, Trainer, TrainingTask, log_step, to_device

log = logging.getLogger(__name__)

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"  # under the work folder
FINISHED_DIR = "finished"  # under the work folder: one finished run per fingerprint
SUMMARY = "pretrain_summary.json"
HISTORY = "history.json"
CURVE = "training_curve.png"
_FINAL_WINDOW = 50  # final_* losses: mean over the last steps, a single step is noisy

# Independent random streams: np.random.default_rng([seed, stream, ...]).
_SPLIT, _EPOCH, _BATCH, _DROPOUT, _EVAL = range(5)

Batch = dict[str, torch.Tensor]


def training_texts(products: pd.DataFrame, train_impressions: pd.DataFrame) -> list[str]:
    """Every title, plus the distinct queries of the training days.

    Titles carry no date: the catalogue is known before the validation and test days; queries
    are, so a word only searched for later must not reach the vocabulary.
    """
    queries = train_impressions["query"]
    return [*products["title"].astype(str), *sorted(queries.astype(str).unique())]


def build_model(
    cfg: PretrainConfig,
    model_cfg: ModelConfig,
    features_manifest: dict,
    tokenizer: BertTokenizerFast,
) -> CeBertForPreTraining:
    """CE-BERT for the variant, sized by the params, or by `cfg.init_from`'s BERT config.

    With `init_from`, the checkpoint's weights seed the encoder (first `num_layers` layers) and
    `tokenizer` must be the checkpoint's.
    """
    sizes: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
    }
    checkpoint_positions = 0
    if cfg.init_from:
        base = BertConfig.from_pretrained(pretrained.resolve(cfg.init_from))
        if len(tokenizer) > base.vocab_size:
            raise AceError(
                f"{cfg.init_from}: the tokenizer has {len(tokenizer)} tokens, the checkpoint "
                f"{base.vocab_size}: pass the checkpoint's own tokenizer"
            )
        sizes = {
            "vocab_size": base.vocab_size,
            "hidden_size": base.hidden_size,
            "num_hidden_layers": min(cfg.num_layers, base.num_hidden_layers),
            "num_attention_heads": base.num_attention_heads,
            "intermediate_size": base.intermediate_size,
            "hidden_act": base.hidden_act,
            "layer_norm_eps": base.layer_norm_eps,
        }
        checkpoint_positions = base.max_position_embeddings
    config = CeBertConfig(
        patch_dim=int(features_manifest["feature_dim"]),
        n_patches=int(features_manifest["n_patches"]),
        pixel_dim=int(features_manifest["pixel_dim"]),
        n_pixel_tokens=int(features_manifest["n_pixel_tokens"]),
        use_patches=model_cfg.use_patches,
        use_pixels=model_cfg.use_pixels,
        patch_source=model_cfg.patch_source,
        max_text_len=cfg.max_text_len,
        text_positions=cfg.text_positions,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=cfg.init_range,
        tip_pooling=cfg.tip_pooling,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        **sizes,
    )
    # Every position of the joint sequence needs an embedding; a checkpoint's extra rows stay.
    config.max_position_embeddings = max(
        cfg.text_positions + config.n_image_tokens, checkpoint_positions
    )
    model = CeBertForPreTraining(config)
    if cfg.init_from:
        unused = init_text_encoder_from(model, pretrained.resolve(cfg.init_from))
        log.info("initialised from %s; %d checkpoint tensors unused", cfg.init_from, len(unused))
    return model


def split_products(
    product_ids: list[str], eval_share: float, seed: int
) -> tuple[list[str], list[str]]:
    """(training ids, held-out ids), a seeded draw of `eval_share` (at least 2) held out."""
    ids = sorted(product_ids)
    n_eval = max(2, round(eval_share * len(ids)))
    if len(ids) - n_eval < 2:
        raise DataError(f"{len(ids)} products: too few to hold out {n_eval} and still train")
    held = set(np.random.default_rng([seed, _SPLIT]).choice(ids, n_eval, replace=False))
    return [i for i in ids if i not in held], [i for i in ids if i in held]


@dataclass(frozen=True)
class Pairs:
    """Title and image product indices (into the dataset's products) and TIP labels."""

    titles: np.ndarray
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.titles)

    def slice(self, start: int, stop: int) -> Pairs:
        return Pairs(self.titles[start:stop], self.images[start:stop], self.labels[start:stop])


class PairDataset:
    """Text/image pairs over a set of products, with BERT masking, collated into tensors.

    `input_ids` are the products' tokenised titles padded to max_text_len; image tokens are read
    from the memory-mapped store by row (`patches`/`pixels` None when the variant reads none).
    """

    def __init__(
        self,
        input_ids: np.ndarray,
        store_rows: np.ndarray,
        patches: np.ndarray | None,
        pixels: np.ndarray | None,
        tokenizer: BertTokenizerFast,
        cfg: PretrainConfig,
    ) -> None:
        self.input_ids = input_ids
        self.store_rows = store_rows
        self.patches = patches
        self.pixels = pixels
        self.mlm_probability = cfg.mlm_probability
        self.mpm_probability = cfg.mpm_probability
        self.special_ids = np.array(sorted(tokenizer.all_special_ids))
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id
        # Random replacements are ordinary tokens: a random [CLS] or [PAD] would be a 4th case.
        self.ordinary_ids = np.setdiff1d(np.arange(len(tokenizer)), self.special_ids)
        has_image = patches is not None or pixels is not None
        self.negatives = cfg.tip_negatives if has_image else 0
        self.tip = self.negatives > 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def pairs(self, rng: np.random.Generator) -> Pairs:
        """One epoch, shuffled: each product matched once and with `negatives` other images."""
        n, k = len(self), self.negatives
        others = np.empty((n, k), np.int64)
        for i in range(n):  # k distinct products other than i (repeats only when too few)
            drawn = rng.choice(n - 1, k, replace=k > n - 1)
            others[i] = drawn + (drawn >= i)
        titles = np.repeat(np.arange(n), 1 + k)
        images = np.concatenate([np.arange(n)[:, None], others], 1).ravel()
        labels = np.tile(np.r_[1, np.zeros(k, np.int64)], n)
        order = rng.permutation(len(titles))
        return Pairs(titles[order], images[order], labels[order])

    def collate(self, pairs: Pairs, rng: np.random.Generator) -> Batch:
        ids = self.input_ids[pairs.titles]
        ids = ids[:, : int((ids != self.pad_id).sum(1).max())]  # pad to the longest title only
        inputs, mlm_labels = mask_tokens(
            ids, rng, self.mlm_probability, self.special_ids, self.mask_id, self.ordinary_ids
        )
        batch = {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy((ids != self.pad_id).astype(np.int64)),
            "mlm_labels": torch.from_numpy(mlm_labels),
        }
        rows = self.store_rows[pairs.images]
        if self.patches is not None:
            feats = self.patches[rows].astype(np.float32)
            batch["patch_features"] = torch.from_numpy(feats)
            batch["patch_mask"] = torch.from_numpy(
                choose_at_least_one(np.ones(feats.shape[:2], bool), self.mpm_probability, rng)
            )
        if self.pixels is not None:
            batch["pixel_values"] = torch.from_numpy(np.ascontiguousarray(self.pixels[rows]))
        if self.tip:
            batch["tip_labels"] = torch.from_numpy(pairs.labels)
        return batch


def patch_statistics(
    patches: np.ndarray, rows: np.ndarray, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation over these products' patch vectors.

    Accumulated in float64 over chunks of products: the store may be larger than memory.
    """
    total = np.zeros(patches.shape[-1])
    squares = np.zeros(patches.shape[-1])
    count = 0
    for begin in range(0, len(rows), chunk):
        block = patches[np.sort(rows[begin : begin + chunk])].astype(np.float64)
        block = block.reshape(-1, block.shape[-1])
        total += block.sum(0)
        squares += (block**2).sum(0)
        count += len(block)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def choose_at_least_one(
    eligible: np.ndarray, probability: float, rng: np.random.Generator
) -> np.ndarray:
    """Each eligible cell with `probability`; a row left empty gets one eligible cell at random."""
    chosen = (rng.random(eligible.shape) < probability) & eligible
    keys = np.where(eligible, rng.random(eligible.shape), -1.0)
    empty = ~chosen.any(1) & eligible.any(1)
    chosen[np.flatnonzero(empty), keys[empty].argmax(1)] = True
    return chosen


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    probability: float,
    special_ids: np.ndarray,
    mask_id: int,
    ordinary_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking: (inputs, labels); labels -100 except at the chosen tokens."""
    chosen = choose_at_least_one(~np.isin(ids, special_ids), probability, rng)
    roll = rng.random(ids.shape)
    random_ids = ordinary_ids[rng.integers(len(ordinary_ids), size=ids.shape)]
    inputs = np.where(chosen & (roll < 0.8), mask_id, ids)
    inputs = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, np.where(chosen, ids, -100)


def pretrain(
    params: Params, out_dir: Path, progress: bool = True, work_dir: Path | None = None
) -> dict[str, float]:
    """Pre-train CE-BERT on the validated products and their image tokens; see the module doc.

    Writes `out_dir/model/` (model + tokenizer + pretrain_summary.json, what fine-tuning loads),
    the loss history and curve. `work_dir` (default: `<out_dir>.work` beside it) keeps the
    checkpoints a killed run resumes from, and each finished run under its fingerprint: the
    same inputs and settings again (e.g. `acebert` after `cebert`, which read the same image
    tokens) copy that result instead of training again.
    """
    start = time.perf_counter()
    cfg, model_cfg = params.pretrain, params.model
    device = resolve_device(cfg.device)
    distributed.setup(device)
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    artifacts = params.paths.artifacts_dir
    products = validated_table(artifacts, "products")
    impressions = validated_table(artifacts, "impressions")
    store = FeatureStore(artifacts / "features")
    products = products[products.product_id.isin(store.row_of)]  # failed images are not in it
    fingerprint = _fingerprint(params, products, impressions, store)
    finished = work_dir / FINISHED_DIR / fingerprint
    summary = f"{MODEL_DIR}/{SUMMARY}"
    reused = checkpoints.reuse_finished(finished, out_dir, summary, "pre-training", start)
    if reused is not None:
        return reused
    train_ids, eval_ids = split_products(list(products.product_id), cfg.eval_share, cfg.seed)

    checkpoint_root = work_dir / CHECKPOINTS_DIR
    checkpoint = checkpoints.latest(checkpoint_root, fingerprint)
    torch.manual_seed(cfg.seed)
    if checkpoint is not None:
        tokenizer = BertTokenizerFast.from_pretrained(checkpoint)
        model = CeBertForPreTraining(CeBertConfig.from_pretrained(checkpoint))
        checkpoints.load_weights(model, checkpoint)
    else:
        if distributed.is_main():
            shutil.rmtree(checkpoint_root, ignore_errors=True)  # another run's: unusable
        if cfg.init_from:
            tokenizer = BertTokenizerFast.from_pretrained(pretrained.resolve(cfg.init_from))
        else:
            texts = training_texts(products, split_days(impressions, params.split).train)
            tokenizer = train_wordpiece(texts, cfg.vocab_size)
        model = build_model(cfg, model_cfg, store.manifest, tokenizer)
        if model_cfg.use_patches:
            rows = np.array([store.row_of[i] for i in train_ids], np.int64)
            mean, std = patch_statistics(store.patches(model_cfg.patch_source), rows)
            model.ce_bert.set_patch_statistics(mean, std)
    model.to(device)

    titles = products.set_index("product_id")["title"].astype(str)
    train_set, eval_set = (
        _dataset(ids, titles, store, model_cfg, tokenizer, cfg) for ids in (train_ids, eval_ids)
    )
    task = PretrainTask(model, train_set, cfg, device)
    schedule = Schedule.of_section("pretrain", cfg, task.total_steps, _DROPOUT)
    trainer = Trainer(
        model,
        task,
        schedule,
        device,
        tokenizer,
        checkpoint_root,
        fingerprint,
        is_head=is_new_layer,
        on_step=lambda step, record: log_step(step, record),  # looked up at call time
    )
    if checkpoint is not None:
        trainer.resume(checkpoint)
    trainer.run(progress)
    if not distributed.is_main():
        return {}

    tasks = ["mlm"] + (["mpm"] if train_set.patches is not None else [])
    tasks += ["tip"] if train_set.tip else []
    metrics = evaluate(model, eval_set, cfg, device)
    for key in ("loss", *(f"{t}_loss" for t in tasks)):
        metrics[f"final_{key}"] = float(np.mean([h[key] for h in trainer.history[-_FINAL_WINDOW:]]))
    metrics.update(
        steps=float(task.total_steps),
        epochs=task.total_steps / task.steps_per_epoch,
        samples_per_second=trainer.samples / trainer.seconds if trainer.seconds else 0.0,
        n_train_products=float(len(train_ids)),
        n_eval_products=float(len(eval_ids)),
        vocab_size=float(model.config.vocab_size),
    )

    model_dir = out_dir / MODEL_DIR
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (out_dir / HISTORY).write_text(json.dumps(trainer.history) + "\n", encoding="utf-8")
    plot_history(trainer.history, ["loss", *(f"{t}_loss" for t in tasks)], out_dir / CURVE)
    metrics["seconds"] = time.perf_counter() - start
    imageless = train_set.patches is None and train_set.pixels is None
    summary = {
        "variant": model_cfg.variant,
        "image_inputs": _image_inputs(model_cfg),
        "tasks": tasks,
        "note": (
            "TwinBERT reads no image: no TIP and no MPM are possible, trained MLM only"
            if imageless
            else f"{' + '.join(t.upper() for t in tasks)} jointly on each mini-batch"
        ),
        "text_padding": "titles padded to max_text_len: image tokens keep fixed positions",
        "resumed_from_step": trainer.first_step,
        "init_from": cfg.init_from,
        "pretrain": cfg.model_dump(mode="json"),
        "features_signature": store.manifest.get("signature"),
        "metrics": metrics,
    }
    (model_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    checkpoints.keep_finished(out_dir, finished)
    shutil.rmtree(checkpoint_root, ignore_errors=True)  # the final model supersedes them
    return metrics


class PretrainTask(TrainingTask):
    """One pre-training step: MLM + MPM + TIP on a mini-batch of pairs (see the module doc)."""

    def __init__(
        self,
        model: CeBertForPreTraining,
        data: PairDataset,
        cfg: PretrainConfig,
        device: torch.device,
    ) -> None:
        self.model, self.data, self.cfg, self.device = model, data, cfg, device
        self.weights = (cfg.loss_weights.mlm, cfg.loss_weights.mpm, cfg.loss_weights.tip)
        # Under torchrun each of N ranks holds batch_size pairs of a global batch N times larger.
        self.global_batch = cfg.batch_size * distributed.world_size()
        samples_per_epoch = len(data) * (1 + data.negatives)
        self.steps_per_epoch = math.ceil(samples_per_epoch / self.global_batch)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self._epoch, self._pairs = -1, None

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        cfg = self.cfg
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._pairs = self.data.pairs(np.random.default_rng([cfg.seed, _EPOCH, epoch]))
        size = self.global_batch
        chunk = self._pairs.slice(index * size, (index + 1) * size)
        rng = np.random.default_rng([cfg.seed, _BATCH, epoch, index])
        batch = self.data.collate(chunk, rng)  # masks drawn for the whole global batch
        rows = distributed.shard(np.arange(len(chunk)), len(chunk))
        batch = to_device({k: v[rows] for k, v in batch.items()}, self.device)
        out = self.model(**batch, loss_weights=self.weights)
        record = {}
        for task in ("mlm", "mpm", "tip"):
            value = getattr(out, f"{task}_loss")
            if value is not None:
                record[f"{task}_loss"] = value.item()
        return out.loss, record, len(chunk)


@torch.no_grad()
def evaluate(
    model: CeBertForPreTraining, data: PairDataset, cfg: PretrainConfig, device: torch.device
) -> dict[str, float]:
    """Held-out MLM accuracy/loss, MPM loss and TIP AUC/accuracy over one seeded set of pairs."""
    was_training = model.training
    model.eval()
    pairs = data.pairs(np.random.default_rng([cfg.seed, _EVAL]))
    correct = masked = 0
    mlm_nll = kl_sum = 0.0
    n_kl = 0
    probs, labels = [], []
    for index, begin in enumerate(range(0, len(pairs), cfg.batch_size)):
        chunk = pairs.slice(begin, begin + cfg.batch_size)
        batch = _to(data.collate(chunk, np.random.default_rng([cfg.seed, _EVAL, index])), device)
        out = model(**batch)
        matched = (
            batch["tip_labels"].bool()
            if data.tip
            else torch.ones(len(chunk), dtype=torch.bool, device=device)
        )
        chosen = (batch["mlm_labels"] != -100) & matched[:, None]
        logits, target = out.mlm_logits, batch["mlm_labels"][chosen]
        correct += int((logits.argmax(-1) == target).sum())
        masked += int(target.numel())
        mlm_nll += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        if out.mpm_logits is not None:
            patches = batch["patch_mask"] & matched[:, None]
            kl = mpm_kl(batch["patch_features"][patches], out.mpm_logits[patches])
            kl_sum += float(kl.sum())
            n_kl += kl.numel()
        if data.tip:
            probs.append(torch.sigmoid(out.tip_logits).cpu().numpy())
            labels.append(chunk.labels)
    model.train(was_training)
    metrics = {"eval_mlm_accuracy": correct / masked, "eval_mlm_loss": mlm_nll / masked}
    if n_kl:
        metrics["eval_mpm_loss"] = kl_sum / n_kl
    if data.tip:
        p, y = np.concatenate(probs), np.concatenate(labels)
        metrics["eval_tip_auc"] = float(roc_auc_score(y, p))
        metrics["eval_tip_accuracy"] = float(((p >= 0.5) == y).mean())
        metrics["eval_tip_majority_baseline"] = data.negatives / (data.negatives + 1)
    return metrics


def _dataset(
    ids: list[str],
    titles: pd.Series,
    store: FeatureStore,
    model_cfg: ModelConfig,
    tokenizer: BertTokenizerFast,
    cfg: PretrainConfig,
) -> PairDataset:
    input_ids = encode_texts(tokenizer, list(titles.loc[ids]), cfg.max_text_len)
    rows = np.array([store.row_of[i] for i in ids], np.int64)
    patches = store.patches(model_cfg.patch_source) if model_cfg.use_patches else None
    pixels = store.pixels() if model_cfg.use_pixels else None
    return PairDataset(input_ids, rows, patches, pixels, tokenizer, cfg)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


def _image_inputs(model_cfg: ModelConfig) -> dict[str, object]:
    """What pre-training reads of the variant: fine-tuning-only switches do not matter here."""
    return {
        "patches": model_cfg.patch_source if model_cfg.use_patches else None,
        "pixels": model_cfg.use_pixels,
    }


def _fingerprint(
    params: Params, products: pd.DataFrame, impressions: pd.DataFrame, store: FeatureStore
) -> str:
    """What pre-training depends on: settings, products, training queries, image tokens."""

    def digest(frame: pd.DataFrame) -> str:
        return hashlib.md5(pd.util.hash_pandas_object(frame, index=False).values).hexdigest()

    relevant = {
        "pretrain": params.pretrain.model_dump(mode="json"),
        "image_inputs": _image_inputs(params.model),
        "split": params.split.model_dump(mode="json"),
        "features": store.manifest.get("signature"),
        "products": digest(products[["product_id", "title"]]),
        "queries": digest(impressions[["query", "day"]]),
    }
    return hashlib.md5(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
