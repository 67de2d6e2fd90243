"""ACE-BERT fine-tuning (paper section 3 and 4.3): two towers over the pre-trained CE-BERT.

Where the paper is vague, this is what we chose:

- Hot queries are left one out in training: the product side of a training pair (q, p) reads
  p's hot queries *without q*. Hot queries are the products' clicked training queries, so
  otherwise 99.98% of the demo world's training pairs carry their own query in the product's
  text, the model learns to copy-match it and neglects title and image (measured in
  docs/finetune.md). Evaluation and serving read the whole list. `cold_product_share` of the
  pairs (drawn per step) read no hot queries, as a product with no clicks yet (off by default:
  measured in docs/finetune.md).
- Training pairs are the distinct (query, product) pairs with at least one click in the training
  days, each once per epoch (a pair clicked often is not repeated: popular pairs would otherwise
  fill the batches with duplicates). Products without a stored image are not in the catalogue.
- Loss: the bidirectional in-batch softmax of Eq. 4-5 (modeling.semantic_matching_loss). Other
  positives in the batch (the same product twice, or a product also clicked for that query in the
  training days) are masked out of the softmax, never used as negatives.
- Mixed negative sampling (4.3): each epoch, the shuffled pairs are split into `partitions`
  partitions; inside each, pairs are grouped by product category (categories in a random order);
  the partitions are laid end to end and cut into mini-batches, whose order is then shuffled. A
  batch therefore holds runs of same-category products: hard negatives. Fewer partitions mean
  longer runs and more of them; the share of a batch's negatives with the positive's category
  is measured every epoch (`same_category_negative_share`) and documented in docs/finetune.md.
- Adversarial learning (3.3), for `acebert` and `cebert_adv`: components/models/adversary.py (the
  classifier learns from detached embeddings with its own optimiser; the towers add its
  `method`'s term, non-saturating domain confusion by default, weighted by a lambda that ramps up
  over training). Instruments: the adversarial / main gradient ratio at the embeddings (every
  `log_every` steps), and at every validation the held-out classifier's accuracy and AUC, the
  distance between the query and product centroids and a fresh linear probe's accuracy.
- Early stopping (4.4.1 "either early stop"): every `eval_every` steps (at most
  `evals_per_epoch` times an epoch) the towers are scored on the validation days by the one
  evaluator (exact search); the best checkpoint by
  `select_metric` is kept and training stops after `patience` evaluations without improvement.
- Each tower mean-pools the encoder's states through its own projection
  (modeling.AceBertForRetrieval), both projections starting equal; the encoder weights are
  shared, as the paper's two CE-BERTs share parameters.
- Optimiser: AdamW with linear warm-up and decay for the towers; Adam for the classifier.
  Checkpoints hold both (and are written only between adversarial rounds), so a killed run
  resumes on the same trajectory; every random draw is a function of (seed, epoch, step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import BertTokenizerFast

from components.config import FinetuneConfig, ModelConfig, Params
from components.data.clicklog import (
    ClickPairs,
    click_pairs,
    hot_queries,
    leave_one_out_texts,
    load_validated,
)
from components.errors import AceError, DataError
from components.features.backbones import resolve_device
from components.features.features import FeatureStore
from components.models.adversary import Adversary, balanced_accuracy
from components.models.keywords import query_keywords
from components.models.keywords import targets as keyword_targets
from components.models.modeling import (
    AceBertForRetrieval,
    CeBertConfig,
    CeBertModel,
    domain_loss,
    is_new_layer,
    semantic_matching_loss,
)
from components.ops.plots import plot_history
from components.retrieval.evaluator import EmbeddingRanker, RetrievalEvaluator, period_evaluators
from components.retrieval.retrieval import (
    HOT_QUERIES_FILE,
    Catalogue,
    embed_products,
    encode_texts,
    query_encoder,
    trim,
)
from components.training import checkpoints, distributed
from components.training.trainer import Schedule, Trainer, TrainingTask, log_step, to_device

log = logging.getLogger(__name__)

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
FINISHED_DIR = "finished"  # under the work folder: one finished run per fingerprint
HISTORY = "history.json"
CURVE = "training_curve.png"
SUMMARY = "finetune_summary.json"
KEYWORDS_FILE = "keywords.json"
_FINAL_WINDOW = 50

# random streams: np.random.default_rng([seed, stream, ...])
_EPOCH, _DROPOUT, _PROBE, _COLD = 1, 2, 3, 4


def mixed_negative_batches(
    categories: np.ndarray, partitions: int, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch of mini-batches (pair indices), same-category runs inside each partition."""
    order = rng.permutation(len(categories))
    grouped = []
    for part in np.array_split(order, min(partitions, len(order))):
        names, codes = np.unique(categories[part], return_inverse=True)
        rank = rng.permutation(len(names))[codes]  # a random category order per partition
        grouped.append(part[np.argsort(rank, kind="stable")])
    laid = np.concatenate(grouped)
    batches = [laid[i : i + batch_size] for i in range(0, len(laid), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def same_category_share(batches: list[np.ndarray], categories: np.ndarray) -> float:
    """Share of in-batch negatives (i, j != i) whose category is the positive's."""
    same = total = 0
    for batch in batches:
        cats = categories[batch]
        n = len(cats)
        _, counts = np.unique(cats, return_counts=True)
        same += int((counts * (counts - 1)).sum())
        total += n * (n - 1)
    return same / total if total else 0.0


def also_positive(
    query: np.ndarray, product: np.ndarray, keys: np.ndarray, n_products: int
) -> torch.Tensor:
    """(B, B) bool: (query i, product j) is a training positive pair (diagonal included)."""
    grid = query[:, None].astype(np.int64) * n_products + product[None, :]
    found = np.searchsorted(keys, grid).clip(max=len(keys) - 1)
    return torch.from_numpy(keys[found] == grid)


def finetune(
    params: Params, out_dir: Path, progress: bool = True, work_dir: Path | None = None
) -> dict[str, float]:
    """Fine-tune the variant's retriever from `artifacts/pretrain/model`; see the module doc.

    Writes `out_dir/model/` (model + tokenizer + hot queries + summary), the loss history and
    curve; resumes from checkpoints under `work_dir` (default `<out_dir>.work`).
    """
    start = time.perf_counter()
    cfg, model_cfg = params.finetune, params.model
    device = resolve_device(cfg.device)
    distributed.setup(device)
    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    artifacts = params.paths.artifacts_dir
    pretrained = artifacts / "pretrain" / "model"
    if not (pretrained / "config.json").exists():
        raise DataError(f"{pretrained}: no pre-trained CE-BERT here (run the pretrain stage)")
    products, _, periods = load_validated(params)
    store = FeatureStore(artifacts / "features")
    hot = hot_queries(periods.train, cfg.hot_queries) if model_cfg.hot_queries else {}

    tokenizer = BertTokenizerFast.from_pretrained(pretrained)
    config = _retrieval_config(pretrained, model_cfg, cfg)
    keyword_vocabulary, keywords = [], {}
    if model_cfg.keyword_enhancement:
        titles = dict(zip(products["product_id"], products["title"].astype(str), strict=True))
        keyword_vocabulary, keywords = query_keywords(periods.train, titles, cfg.make)
        config.n_keywords = len(keyword_vocabulary)
    catalogue = Catalogue.build(
        products, store, model_cfg, tokenizer, hot, cfg.max_product_text_len
    )
    pairs = click_pairs(periods.train, catalogue.index_of())
    validation = period_evaluators(params, periods, catalogue.product_ids).get("val")
    fingerprint = _fingerprint(params, pretrained, pairs, catalogue, validation)
    finished = work_dir / FINISHED_DIR / fingerprint
    summary = f"{MODEL_DIR}/{SUMMARY}"
    reused = checkpoints.reuse_finished(finished, out_dir, summary, "fine-tuning", start)
    if reused is not None:
        return reused

    checkpoint_root = work_dir / CHECKPOINTS_DIR
    checkpoint = checkpoints.latest(checkpoint_root, fingerprint)
    torch.manual_seed(cfg.seed)
    model = AceBertForRetrieval(config)
    if checkpoint is not None:
        checkpoints.load_weights(model, checkpoint)
    else:
        if distributed.is_main():
            shutil.rmtree(checkpoint_root, ignore_errors=True)
        encoder = CeBertModel.from_pretrained(pretrained)
        model.ce_bert.load_state_dict(encoder.state_dict())  # strict: every encoder weight
    model.to(device)

    query_ids = encode_texts(tokenizer, pairs.queries, cfg.max_query_len)
    task = FinetuneTask(model, tokenizer, catalogue, pairs, query_ids, params, device, hot)
    task.validation = validation if cfg.eval_every else None
    if keywords:
        task.keyword_targets = torch.from_numpy(
            keyword_targets(pairs.queries, keywords, len(keyword_vocabulary))
        )
    trainer = make_trainer(model, task, params, device, tokenizer, checkpoint_root, fingerprint)
    if checkpoint is not None:
        trainer.resume(checkpoint)
    trainer.run(progress)
    best_step = trainer.restore_best()
    if not distributed.is_main():
        return {}

    model_dir = out_dir / MODEL_DIR
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / HOT_QUERIES_FILE).write_text(json.dumps(hot) + "\n", encoding="utf-8")
    if keywords:  # what the keyword head predicts, for inspection
        examples = {q: [keyword_vocabulary[i] for i in kw] for q, kw in keywords.items()}
        payload = {"vocabulary": keyword_vocabulary, "queries": examples}
        (model_dir / KEYWORDS_FILE).write_text(json.dumps(payload) + "\n", encoding="utf-8")
    (out_dir / HISTORY).write_text(json.dumps(trainer.history) + "\n", encoding="utf-8")
    keys = ["main_loss"] + (["adv_loss", "classifier_loss"] if model_cfg.adversarial else [])
    keys += ["keyword_loss"] if keywords else []
    # The paper's Fig. 6 (the semantic-matching loss) beside the adversary's instruments.
    instruments = [
        f"val_{cfg.select_metric}",
        "val_main_loss",
        "val_centroid_gap",
        "val_probe_accuracy",
    ]
    if model_cfg.adversarial:
        instruments += ["adv_grad_ratio", "val_classifier_accuracy"]
    plot_history(trainer.history, keys + instruments, out_dir / CURVE)

    metrics = {
        f"final_{key}": float(np.mean(values[-_FINAL_WINDOW:]))
        for key in [*keys, "adv_grad_ratio", "classifier_accuracy"]
        if (values := [h[key] for h in trainer.history if key in h])
    }
    metrics.update(
        steps=float(task.total_steps),
        epochs=task.total_steps / task.steps_per_epoch,
        n_pairs=float(len(pairs)),
        n_train_queries=float(len(pairs.queries)),
        n_products=float(len(catalogue)),
        products_with_hot_queries=float(sum(pid in hot for pid in catalogue.product_ids)),
        queries_with_keywords=float(len(keywords)),
        same_category_negative_share=float(np.mean(task.shares)) if task.shares else 0.0,
        samples_per_second=trainer.samples / trainer.seconds if trainer.seconds else 0.0,
        seconds=time.perf_counter() - start,
    )
    if best_step is not None:
        best = dict(trainer.history[best_step - 1])
        metrics.update(
            best_step=float(best_step),
            stopped_early=float(trainer.stopped_at is not None),
            steps_trained=float(trainer.stopped_at or task.total_steps),
            **{k: v for k, v in best.items() if k.startswith("val_")},
        )
    summary = {
        "variant": model_cfg.variant,
        "hot_queries": model_cfg.hot_queries,
        "adversarial": model_cfg.adversarial,
        "finetune": cfg.model_dump(mode="json"),
        "resumed_from_step": trainer.first_step,
        "metrics": metrics,
    }
    (model_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    checkpoints.keep_finished(out_dir, finished)
    shutil.rmtree(checkpoint_root, ignore_errors=True)
    return metrics


def _retrieval_config(
    pretrained: Path, model_cfg: ModelConfig, cfg: FinetuneConfig
) -> CeBertConfig:
    config = CeBertConfig.from_pretrained(pretrained)
    reads = (
        config.use_patches,
        config.use_pixels,
        config.patch_source if config.use_patches else None,
    )
    wants = (
        model_cfg.use_patches,
        model_cfg.use_pixels,
        model_cfg.patch_source if model_cfg.use_patches else None,
    )
    if reads != wants:
        raise AceError(
            f"{pretrained}: pre-trained for other image inputs (patches, pixels, source) = {reads} "
            f"than variant {model_cfg.variant} reads {wants}: re-run pretrain for this variant"
        )
    if cfg.max_product_text_len > config.text_positions:
        raise AceError(
            f"finetune.max_product_text_len {cfg.max_product_text_len} exceeds the model's "
            f"text_positions {config.text_positions} (pretrain.text_positions)"
        )
    config.embedding_dim = cfg.embedding_dim
    config.classifier_hidden = cfg.adversarial.classifier_hidden
    if cfg.dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = cfg.dropout
    config.product_pooling = cfg.pooling
    config.modal_adaptation = model_cfg.modal_adaptation
    config.modal_gate_hidden = cfg.make.gate_hidden
    return config


def make_trainer(
    model: AceBertForRetrieval,
    task: FinetuneTask,
    params: Params,
    device: torch.device,
    tokenizer: BertTokenizerFast,
    checkpoint_root: Path | None = None,
    fingerprint: str = "",
) -> Trainer:
    """The one Trainer, scheduled by the `finetune` params."""
    cfg = params.finetune
    schedule = dataclasses.replace(
        Schedule.of_section("finetune", cfg, task.total_steps, _DROPOUT),
        eval_every=validation_interval(cfg.eval_every, cfg.evals_per_epoch, task.steps_per_epoch)
        if task.validation is not None
        else 0,
        patience=cfg.patience,
        select_metric=cfg.select_metric,
    )
    # log_step is looked up here at call time, so a caller can intercept the records.
    return Trainer(
        model,
        task,
        schedule,
        device,
        tokenizer,
        checkpoint_root,
        fingerprint,
        is_head=is_new_layer,
        on_step=lambda step, record: log_step(step, record),
    )


def validation_interval(eval_every: int, evals_per_epoch: int, steps_per_epoch: int) -> int:
    """Steps between validations: `eval_every`, widened so that an epoch holds at most
    `evals_per_epoch` of them. Each validation encodes the whole catalogue; with a fixed interval
    their number grows with the training pairs and the cost of each with the products, so on a
    larger world validation would outgrow training (docs/scale.md)."""
    if not eval_every or not evals_per_epoch:
        return eval_every
    return max(eval_every, math.ceil(steps_per_epoch / evals_per_epoch))


class FinetuneTask(TrainingTask):
    """One fine-tuning step: the two towers on a mixed negative batch (see the module doc)."""

    def __init__(
        self,
        model: AceBertForRetrieval,
        tokenizer: BertTokenizerFast,
        catalogue: Catalogue,
        pairs: ClickPairs,
        query_ids: np.ndarray,
        params: Params,
        device: torch.device,
        hot: dict[str, list[str]] | None = None,
    ) -> None:
        cfg = params.finetune
        self.hot = hot or {}
        self.model, self.tokenizer, self.catalogue, self.pairs = model, tokenizer, catalogue, pairs
        self.query_ids, self.cfg, self.device = query_ids, cfg, device
        self.eval_batch = params.evaluate.batch_size
        self.pair_categories = catalogue.categories[pairs.product]
        self.keys = pairs.keys(len(catalogue))
        # Under torchrun each of N ranks holds batch_size rows of a global batch N times larger.
        self.global_batch = cfg.batch_size * distributed.world_size()
        self.steps_per_epoch = math.ceil(len(pairs) / self.global_batch)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.adversary = (
            Adversary(model.domain_classifier, cfg.adversarial, self.total_steps)
            if params.model.adversarial
            else None
        )
        self.validation: RetrievalEvaluator | None = None
        self.keyword_targets: torch.Tensor | None = None  # (training queries, keywords): MAKE
        self.shares: list[float] = []
        self._epoch, self._batches = -1, []

    def trained_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [
            (n, p) for n, p in model.named_parameters() if not n.startswith("domain_classifier.")
        ]

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, _EPOCH, epoch])
        return mixed_negative_batches(
            self.pair_categories, self.cfg.partitions, self.global_batch, rng
        )

    def rows(self, step: int) -> np.ndarray:
        """The global batch of training pairs of this step."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch_batches(epoch)
            self.shares.append(same_category_share(self._batches, self.pair_categories))
        return self._batches[index % len(self._batches)]

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        """Eq. 5 over the global batch (this rank encodes its slice; embeddings are gathered
        with their gradients), + the adversary's term, + MAKE's keyword loss."""
        model, cfg = self.model, self.cfg
        rows = self.rows(step)
        query, product = self.pairs.query[rows], self.pairs.product[rows]
        mine = distributed.shard(np.arange(len(rows)), len(rows))
        cold = self.cold_rows(step, len(rows))
        q, p = self.embed(query[mine], product[mine], cold[mine])
        q, p = distributed.gather(q, len(rows)), distributed.gather(p, len(rows))
        positives = also_positive(query, product, self.keys, len(self.catalogue)).to(self.device)
        main = semantic_matching_loss(q.float(), p.float(), cfg.gamma, positives)
        record = {"main_loss": main.item()}
        loss = main
        if self.keyword_targets is not None:
            keyword = model.keyword_loss(q, self.keyword_targets[query].to(self.device))
            loss = loss + cfg.make.keyword_weight * keyword
            record["keyword_loss"] = keyword.item()
        if self.adversary is not None:
            term = self.adversary.tower_loss(q, p, step)
            loss = loss + term
            with torch.no_grad():
                record["adv_loss"] = domain_loss(model.domain_classifier, q, p).item()
            record["adv_weight"] = self.adversary.weight(step)
            if step % cfg.adversarial.log_every == 0:
                record["adv_grad_ratio"] = gradient_ratio(term, main, (q, p))
            self.adversary.observe(q, p)
        return loss, record, len(rows)

    def cold_rows(self, step: int, size: int) -> np.ndarray:
        """Which rows of this step's global batch read no hot queries (`cold_product_share`);
        drawn from the step alone, so every rank and a resumed run draw the same."""
        share = self.cfg.cold_product_share
        if not self.hot or share == 0:
            return np.zeros(size, dtype=bool)
        return np.random.default_rng([self.cfg.seed, _COLD, step]).random(size) < share

    def embed(
        self, query: np.ndarray, product: np.ndarray, cold: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both towers' embeddings of these training pairs (products read their hot queries
        without the pair's own query; `cold` rows read none)."""
        model, cfg = self.model, self.cfg
        if not len(query):  # an empty slice of a global batch smaller than the ranks
            dim = model.config.embedding_dim
            empty = torch.zeros((0, dim), device=self.device, requires_grad=True)
            return empty, empty
        q_ids, q_mask = trim(self.query_ids[query], self.tokenizer.pad_token_id)
        p_batch = self.catalogue.inputs(product)
        if self.hot:
            texts = leave_one_out_texts(
                self.catalogue.product_ids,
                self.catalogue.titles,
                self.hot,
                product,
                [self.pairs.queries[i] for i in query],
                self.tokenizer.sep_token,
                cold,
            )
            ids = encode_texts(self.tokenizer, texts, cfg.max_product_text_len)
            p_batch["input_ids"], p_batch["attention_mask"] = trim(ids, self.tokenizer.pad_token_id)
        q_batch = to_device({"input_ids": q_ids, "attention_mask": q_mask}, self.device)
        q = model.encode_queries(**q_batch)
        return q, model.encode_products(**to_device(p_batch, self.device))

    def after_update(self, step: int) -> dict[str, float]:
        if self.adversary is not None and self.adversary.due():
            return self.adversary.classifier_steps()
        return {}

    def can_checkpoint(self) -> bool:
        """Checkpoints fall between adversarial rounds: no embeddings are pending then."""
        return self.adversary is None or not self.adversary.pending

    def states(self) -> dict[str, object]:
        if self.adversary is None:
            return {}
        return {"classifier_optimizer": self.adversary.optimizer.state_dict()}

    def load_states(self, states: dict[str, object]) -> None:
        if self.adversary is not None:
            self.adversary.optimizer.load_state_dict(states["classifier_optimizer"])

    def validate(self, step: int) -> dict[str, float]:
        """The towers on the validation days (exact search), and the modality gap."""
        assert self.validation is not None
        model, tokenizer, cfg = self.model, self.tokenizer, self.cfg
        products = embed_products(model, self.catalogue, self.eval_batch, self.device, False)

        encode = query_encoder(model, tokenizer, cfg.max_query_len, self.eval_batch, self.device)
        ranker = EmbeddingRanker(self.catalogue.product_ids, products, encode)
        figures = self.validation(ranker, exact=False)
        record = {f"val_{k}": v for k, v in figures.items() if not k.endswith(("queries", "rows"))}
        record["val_main_loss"] = self.validation_loss(ranker, products)
        queries = ranker.embed(self.validation.queries)
        record.update(modality_gap(queries, products, cfg.seed))
        if self.adversary is not None:
            record.update(held_out_classifier(model.domain_classifier, queries, products))
        return record

    def validation_loss(self, ranker: EmbeddingRanker, products: np.ndarray) -> float:
        """Eq. 5 on the validation days' distinct clicked pairs, in fixed batches of the
        training size (in-batch negatives, other positives masked): the task's loss on days it
        never trained on, with and without an adversary alike."""
        assert self.validation is not None
        pairs = click_pairs(self.validation.impressions, self.catalogue.index_of())
        keys = pairs.keys(len(self.catalogue))
        queries = torch.from_numpy(ranker.embed(pairs.queries))
        losses, sizes = [], []
        for begin in range(0, len(pairs), self.cfg.batch_size):
            rows = np.arange(begin, min(begin + self.cfg.batch_size, len(pairs)))
            query, product = pairs.query[rows], pairs.product[rows]
            if len(rows) < 2:
                continue
            positives = also_positive(query, product, keys, len(self.catalogue))
            q, p = queries[query], torch.from_numpy(products[product])
            losses.append(semantic_matching_loss(q, p, self.cfg.gamma, positives).item())
            sizes.append(len(rows))
        return float(np.average(losses, weights=sizes)) if losses else float("nan")


def gradient_ratio(term: torch.Tensor, main: torch.Tensor, at: tuple[torch.Tensor, ...]) -> float:
    """||d term / d embeddings|| / ||d main / d embeddings||: how much the adversary moves the
    towers relative to the task, where both reach them."""
    adversarial = torch.autograd.grad(term, at, retain_graph=True, allow_unused=True)
    task = torch.autograd.grad(main, at, retain_graph=True)
    norm = lambda grads: torch.sqrt(sum((g**2).sum() for g in grads if g is not None))  # noqa: E731
    return float(norm(adversarial) / norm(task).clamp_min(1e-12))


def modality_gap(queries: np.ndarray, products: np.ndarray, seed: int) -> dict[str, float]:
    """How far apart the two kinds of embedding lie: the distance between their centroids, and
    the held-out balanced accuracy of a fresh linear probe telling them apart (0.5: none)."""
    from sklearn.linear_model import LogisticRegression

    gap = float(np.linalg.norm(queries.mean(0) - products.mean(0)))
    x = np.concatenate([queries, products])
    y = np.r_[np.ones(len(queries)), np.zeros(len(products))]
    half = np.random.default_rng([seed, _PROBE]).random(len(x)) < 0.5
    if len(set(y[half])) < 2 or len(set(y[~half])) < 2:
        return {"val_centroid_gap": gap}
    probe = LogisticRegression(class_weight="balanced", max_iter=1000).fit(x[half], y[half])
    predicted = probe.predict(x[~half])
    per_class = [(predicted[y[~half] == c] == c).mean() for c in (0, 1)]
    return {"val_centroid_gap": gap, "val_probe_accuracy": float(np.mean(per_class))}


@torch.no_grad()
def held_out_classifier(
    classifier: nn.Module, queries: np.ndarray, products: np.ndarray
) -> dict[str, float]:
    """The domain classifier on validation embeddings it never trained on: balanced accuracy and
    ROC AUC of telling queries from products (0.5: the towers fool it)."""
    from sklearn.metrics import roc_auc_score

    device = next(classifier.parameters()).device
    x = torch.from_numpy(np.concatenate([queries, products])).to(device)
    logits = classifier(x).squeeze(-1).float().cpu()
    y = np.r_[np.ones(len(queries)), np.zeros(len(products))]
    return {
        "val_classifier_accuracy": balanced_accuracy(logits, len(queries)),
        "val_classifier_auc": float(roc_auc_score(y, logits.numpy())),
    }


def _fingerprint(
    params: Params,
    pretrained: Path,
    pairs: ClickPairs,
    catalogue: Catalogue,
    validation: RetrievalEvaluator | None,
) -> str:
    digest = hashlib.md5()
    digest.update((validation.digest if validation else "no validation").encode())
    digest.update((pretrained / checkpoints.WEIGHTS).read_bytes())
    digest.update(np.ascontiguousarray(pairs.query).tobytes())
    digest.update(np.ascontiguousarray(pairs.product).tobytes())
    digest.update(np.ascontiguousarray(catalogue.text_ids).tobytes())
    settings = {
        "finetune": params.finetune.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "split": params.split.model_dump(mode="json"),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()
