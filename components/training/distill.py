"""Query-tower distillation (paper 4.7): a shallower student reproduces the teacher's queries.

Only the query side is compressed, as the paper does: product embeddings are computed offline
by the teacher and indexed, so their cost never reaches a search. Choices:

- The student is the fine-tuned model with `layers` encoder layers (0: half the teacher's),
  initialised from evenly spaced teacher layers that include the last one (4 -> 2 keeps layers
  1 and 3; DistilBERT keeps one of every two) and every other teacher weight.
- Texts: the distinct queries of the training days (hot queries are among them) and, with
  `include_titles`, the catalogue's titles cut to the query length: tail queries at serving
  time are unseen, and titles carry the same vocabulary.
- Loss: 1 - cos(student, teacher) per text, plus `retrieval_weight` times the KL divergence
  between the teacher's and the student's softmax over the whole catalogue's (frozen, teacher)
  product embeddings at temperature 1 / gamma: the student is taught to rank like the teacher.
- The stage reports the student's Recall@100 on the test days (and the validation days,
  `val_*`) next to the teacher's, both against the teacher's product embeddings, so the ratio is
  the cost of compression alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.config import Params
from components.data.clicklog import load_validated
from components.errors import AceError
from components.features.backbones import resolve_device
from components.features.features import FeatureStore
from components.models.modeling import AceBertForRetrieval
from components.retrieval.ann import build_index
from components.retrieval.evaluator import PERIOD_PREFIX, EmbeddingRanker, period_evaluators
from components.retrieval.retrieval import (
    HOT_QUERIES_FILE,
    PRODUCT_EMBEDDINGS,
    Catalogue,
    embed_products,
    embed_queries,
    encode_texts,
    load_retriever,
    query_encoder,
    trim,
)
from components.training.trainer import Schedule, Trainer, TrainingTask, to_device

STUDENT_DIR = "student"
SUMMARY = "distill_summary.json"
_LAYER_KEY = "ce_bert.bert.encoder.layer."
_DROPOUT = 1  # the random stream of each step's dropout
# The whole-catalogue figures reported for teacher and student (slices stay with evaluate).
REPORTED = ("gauc", "recall_at_10", "recall_at_50", "recall_at_100", "mrr", "ndcg_at_10")


def kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, the last one included: 4 -> 2 gives [1, 3]."""
    if not 1 <= student_layers <= teacher_layers:
        raise AceError(f"a student of {student_layers} layers from a teacher of {teacher_layers}")
    step = teacher_layers / student_layers
    return [round(step * (i + 1)) - 1 for i in range(student_layers)]


def make_student(teacher: AceBertForRetrieval, layers: int) -> AceBertForRetrieval:
    """The teacher with `layers` encoder layers, each copied from a kept teacher layer."""
    keep = kept_layers(teacher.config.num_hidden_layers, layers)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = layers
    student = AceBertForRetrieval(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(_LAYER_KEY):
            index, rest = key.removeprefix(_LAYER_KEY).split(".", 1)
            if int(index) not in keep:
                continue
            key = f"{_LAYER_KEY}{keep.index(int(index))}.{rest}"
        state[key] = value.clone()
    student.load_state_dict(state)  # strict: every student weight comes from the teacher
    return student


class DistillTask(TrainingTask):
    """One distillation step: the student follows the teacher's query embeddings (cosine) and
    its ranking of the catalogue (KL at temperature 1 / gamma)."""

    def __init__(
        self,
        student: AceBertForRetrieval,
        ids: np.ndarray,
        targets: torch.Tensor,
        products: torch.Tensor,
        params: Params,
        pad_id: int,
        device: torch.device,
    ) -> None:
        self.student, self.ids, self.targets, self.products = student, ids, targets, products
        self.cfg, self.gamma, self.pad_id, self.device = (
            params.distill,
            params.finetune.gamma,
            pad_id,
            device,
        )
        self.steps_per_epoch = -(-len(ids) // self.cfg.batch_size)
        self.total_steps = self.cfg.epochs * self.steps_per_epoch
        self._epoch, self._order = -1, np.arange(0)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        cfg = self.cfg
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.ids))
        rows = self._order[index * cfg.batch_size : (index + 1) * cfg.batch_size]
        input_ids, mask = trim(self.ids[rows], self.pad_id)
        batch = to_device({"input_ids": input_ids, "attention_mask": mask}, self.device)
        q = self.student.encode_queries(**batch)
        teacher_q = self.targets[rows]
        cosine = (1 - (q * teacher_q).sum(-1)).mean()
        loss = cosine
        record = {"cosine_loss": cosine.item()}
        if cfg.retrieval_weight > 0:
            log_student = F.log_softmax(self.gamma * q @ self.products.T, -1)
            log_teacher = F.log_softmax(self.gamma * teacher_q @ self.products.T, -1)
            kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
            loss = loss + cfg.retrieval_weight * kl
            record["ranking_kl"] = kl.item()
        return loss, record, len(rows)


def distill(params: Params, out_dir: Path, progress: bool = True) -> dict[str, float]:
    start = time.perf_counter()
    cfg = params.distill
    device = resolve_device(cfg.device)
    artifacts = params.paths.artifacts_dir
    teacher_dir = artifacts / "finetune" / "model"
    teacher, tokenizer = load_retriever(teacher_dir)
    teacher.to(device).eval()
    layers = cfg.layers or max(1, teacher.config.num_hidden_layers // 2)
    torch.manual_seed(cfg.seed)
    student = make_student(teacher, layers).to(device)

    products, _, periods = load_validated(params)
    train = periods.train
    hot = json.loads((teacher_dir / HOT_QUERIES_FILE).read_text(encoding="utf-8"))
    store = FeatureStore(artifacts / "features")
    catalogue = Catalogue.build(
        products, store, params.model, tokenizer, hot, params.finetune.max_product_text_len
    )
    embeddings_file = artifacts / "evaluate" / PRODUCT_EMBEDDINGS
    if embeddings_file.exists():
        product_emb = np.load(embeddings_file)
    else:
        product_emb = embed_products(teacher, catalogue, params.evaluate.batch_size, device)
    if len(product_emb) != len(catalogue):
        raise AceError(f"{embeddings_file}: {len(product_emb)} rows for {len(catalogue)} products")
    products_t = torch.from_numpy(product_emb).to(device)

    texts = sorted(set(train["query"].astype(str)))
    if cfg.include_titles:
        texts += catalogue.titles
    max_len = params.finetune.max_query_len
    batch = params.evaluate.batch_size
    ids = encode_texts(tokenizer, texts, max_len)
    targets = torch.from_numpy(
        embed_queries(teacher, tokenizer, texts, max_len, params.evaluate.batch_size, device)
    ).to(device)

    task = DistillTask(student, ids, targets, products_t, params, tokenizer.pad_token_id, device)
    schedule = Schedule(
        name="distill",
        total_steps=task.total_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=0.01,  # AdamW's default, as before the one Trainer
        warmup_steps=cfg.warmup_steps,
        grad_clip=1.0,
        seed=cfg.seed,
        dropout_stream=_DROPOUT,
        precision=cfg.precision,
    )
    trainer = Trainer(student, task, schedule, device, tokenizer)
    trainer.run(progress)
    history = trainer.history
    student.eval()

    # Recall against the teacher's product embeddings, both ranked the way they would serve
    # (through an index of the served type): the ratio is the cost of compression. The test days
    # are the figures the gate reads; the validation day's (`val_*`) choose distillation's settings.
    served_index = build_index(product_emb, params.index)
    recall = f"recall_at_{max(params.evaluate.ks)}"

    rankers = {
        name: EmbeddingRanker(
            catalogue.product_ids,
            product_emb,
            query_encoder(model, tokenizer, max_len, batch, device),
            served_index,
        )
        for name, model in (("teacher", teacher), ("student", student))
    }
    metrics: dict[str, float] = {}
    for period, evaluator in period_evaluators(params, periods, catalogue.product_ids).items():
        prefix = PERIOD_PREFIX[period]
        for name, ranker in rankers.items():
            figures = evaluator(ranker, exact=False)
            metrics.update({f"{prefix}{name}_{k}": v for k, v in figures.items() if k in REPORTED})
        teacher_recall = metrics[f"{prefix}teacher_{recall}"]
        metrics[f"{prefix}student_over_teacher_{recall}"] = (
            metrics[f"{prefix}student_{recall}"] / teacher_recall if teacher_recall else 0.0
        )
    metrics.update(
        student_layers=float(layers),
        teacher_layers=float(teacher.config.num_hidden_layers),
        texts=float(len(texts)),
        final_cosine_loss=float(np.mean([h["cosine_loss"] for h in history[-20:]])),
        samples_per_second=trainer.samples / trainer.seconds if trainer.seconds else 0.0,
        seconds=time.perf_counter() - start,
    )

    out_dir = Path(out_dir)
    student_dir = out_dir / STUDENT_DIR
    student.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    summary = {
        "kept_teacher_layers": kept_layers(teacher.config.num_hidden_layers, layers),
        "distill": cfg.model_dump(mode="json"),
        "metrics": metrics,
    }
    (student_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "history.json").write_text(json.dumps(history) + "\n", encoding="utf-8")
    return metrics
