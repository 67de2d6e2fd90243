"""The retrievers a search engineer would pick instead of ace, on the same rows as ace.

Every baseline ranks the same catalogue (products with a stored image, as ace's towers) and is
scored by the one `RetrievalEvaluator` on the same validation and test impressions:

- `bm25`: BM25 over the titles (components/retrieval/bm25.py);
- `st_zeroshot_title`: a sentence-transformers model (`baselines.model`, by default the packaged
  all-MiniLM-L6-v2), no training, query vs title;
- `st_zeroshot_hot`: the same model, query vs title + hot queries (the product's most-clicked
  training-day queries, joined exactly as ace's product tower reads them);
- `st_finetuned`: that model fine-tuned with sentence-transformers' own trainer and
  `MultipleNegativesRankingLoss` (in-batch negatives, scale 20 = ace's gamma, no duplicate texts
  in a batch) on ace's training pairs: the distinct clicked (query, product) pairs of the training
  days, product text = title + hot queries with the pair's own query left out, as ace trains.

Embedding baselines rank through an index of the served type (`index` params), exactly as
ace's figures are taken, and their exact figures are reported beside them. Nothing here depends
on ace's model, so the stage is cached by DVC: a change to ace does not retrain the baselines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.config import BaselinesConfig, Params
from components.data.clicklog import (
    click_pairs,
    hot_queries,
    leave_one_out_texts,
    load_validated,
    product_text,
)
from components.errors import AceError
from components.features.backbones import resolve_device
from components.features.features import FeatureStore
from components.retrieval.ann import build_index
from components.retrieval.bm25 import Bm25Ranker
from components.retrieval.evaluator import (
    PERIOD_PREFIX,
    EmbeddingRanker,
    Ranker,
    period_evaluators,
    prefixed,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

NAMES = ("bm25", "st_zeroshot_title", "st_zeroshot_hot", "st_finetuned")
LABELS = {
    "bm25": "BM25 over titles",
    "st_zeroshot_title": "MiniLM, no training, title",
    "st_zeroshot_hot": "MiniLM, no training, title + hot queries",
    "st_finetuned": "MiniLM fine-tuned (MNRL), title + hot queries",
}
FINETUNED_DIR = "st_finetuned"
RESULTS_FILE = "baselines.json"  # metrics, the evaluated rows' digests, recall curves


def run_baselines(params: Params, out_dir: Path, progress: bool = True) -> dict[str, float]:
    """Score every baseline on the validation and test periods; writes `out_dir/baselines.json`
    and the fine-tuned model under `out_dir/st_finetuned/`."""
    from sentence_transformers import SentenceTransformer

    from components.models import pretrained

    start = time.perf_counter()
    cfg = params.baselines
    device = resolve_device(cfg.device)
    artifacts = params.paths.artifacts_dir
    products, _, periods = load_validated(params)
    store = FeatureStore(artifacts / "features")
    catalogue = products[products["product_id"].isin(store.row_of)].sort_values("product_id")
    product_ids = list(catalogue["product_id"])
    titles = list(catalogue["title"].astype(str))
    hot = hot_queries(periods.train, params.finetune.hot_queries)
    evaluators = period_evaluators(params, periods, product_ids)

    try:
        model = SentenceTransformer(pretrained.resolve(cfg.model), device=str(device))
    except OSError as err:
        raise AceError(f"baselines.model {cfg.model!r}: cannot load it offline ({err})") from err
    model.max_seq_length = cfg.max_seq_length
    sep = model.tokenizer.sep_token
    with_hot = [
        product_text(t, hot.get(pid, []), sep) for pid, t in zip(product_ids, titles, strict=True)
    ]

    metrics: dict[str, float] = {}
    curves: dict[str, list[float]] = {}

    def score(name: str, ranker: Ranker) -> None:
        for period, evaluator in evaluators.items():
            metrics.update(prefixed(evaluator(ranker), PERIOD_PREFIX[period], f"{name}_"))
        curves[name] = evaluators["test"].recall_curve(ranker).tolist()

    score("bm25", Bm25Ranker(product_ids, titles))
    # Zero-shot rankers are scored before fine-tuning changes the model under them.
    score("st_zeroshot_title", _st_ranker(model, product_ids, titles, params, progress))
    score("st_zeroshot_hot", _st_ranker(model, product_ids, with_hot, params, progress))
    out_dir = Path(out_dir)
    training = _finetune(
        model, periods.train, product_ids, titles, hot, cfg, out_dir / FINETUNED_DIR, progress
    )
    score("st_finetuned", _st_ranker(model, product_ids, with_hot, params, progress))
    results = {
        "model": cfg.model,
        "rows_digest": {period: e.digest for period, e in evaluators.items()},
        "metrics": metrics,
        "recall_curves": curves,
    }
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    metrics.update(training, seconds=time.perf_counter() - start)
    return metrics


def _st_ranker(
    model: SentenceTransformer,
    product_ids: list[str],
    texts: list[str],
    params: Params,
    progress: bool,
) -> EmbeddingRanker:
    batch = params.baselines.batch_size

    def encode(queries: list[str]) -> np.ndarray:
        return model.encode(queries, batch_size=batch, normalize_embeddings=True)

    embeddings = model.encode(
        texts, batch_size=batch, normalize_embeddings=True, show_progress_bar=progress
    )
    return EmbeddingRanker(product_ids, embeddings, encode, build_index(embeddings, params.index))


def _finetune(
    model: SentenceTransformer,
    train: pd.DataFrame,
    product_ids: list[str],
    titles: list[str],
    hot: dict[str, list[str]],
    cfg: BaselinesConfig,
    out_dir: Path,
    progress: bool,
) -> dict[str, float]:
    """MultipleNegativesRankingLoss on the training pairs (own query left out); saves the model.
    Returns its seconds, steps and pairs."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    start = time.perf_counter()
    pairs = click_pairs(train, {pid: i for i, pid in enumerate(product_ids)})
    queries = [pairs.queries[i] for i in pairs.query]
    sep = model.tokenizer.sep_token
    positives = leave_one_out_texts(product_ids, titles, hot, pairs.product, queries, sep)
    data = Dataset.from_dict({"anchor": queries, "positive": positives})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps or -1,  # transformers: -1 = run the epochs
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            warmup_ratio=cfg.warmup_ratio,
            seed=cfg.seed,
            data_seed=cfg.seed,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            save_strategy="no",
            report_to="none",
            logging_steps=50,
            use_cpu=model.device.type == "cpu",
            disable_tqdm=not progress,
        )
        loss = MultipleNegativesRankingLoss(model, scale=20.0)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
        trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(str(out_dir))
    return {
        "st_finetune_seconds": time.perf_counter() - start,
        "st_finetune_steps": float(trainer.state.global_step),
        "st_finetune_pairs": float(len(queries)),
    }
