"""Drift monitoring: the new days against the champion's training days, and the champion's decay.

Windows: the reference is the champion's training days (its model version's `train_first_day`
to `train_last_day` tags, set by the gate); the current window is every day after the last day
the champion saw (`last_day`). With no such day there is nothing to judge.

Signals, each drifted or not (thresholds in params.yaml `monitor`):
- Evidently column drift (Jensen-Shannon distance > `column_threshold`) of, per search, the
  query's length in words and its out-of-vocabulary rate (the share of its words that are not
  whole tokens of the champion's vocabulary), and, per click, the clicked product's category and
  the click's position;
- Evidently embeddings drift (ROC AUC of a classifier telling the windows apart >
  `embedding_threshold`) of the queries under the champion's query tower (hot-query cache, then
  the distilled student: what it serves) and of the clicked products under its product tower;
- click-through rate at any of the top 3 positions moving by more than `ctr_tolerance` of its
  reference value;
- decay: the served champion's GAUC or Recall@100 on the latest days (as many as its test
  period) more than `decay_tolerance` below its own on its test days, both measured now through
  its bundle (products its index lacks count against it). Its figures over the whole new window
  are reported too.

Drift = at least `min_drifted_signals` signals drifted. Every search and click of both windows
is compared (distinct queries and products are embedded once), up to `max_rows` per window,
sampled by `seed` beyond that.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.config import ModelConfig, Params
from components.data.clicklog import validated_table
from components.errors import AceError, DataError
from components.features.features import FeatureStore
from components.ops import tracking
from components.ops.gate import CHAMPION, LAST_DAY, TRAIN_FIRST_DAY, TRAIN_LAST_DAY, evaluate_served
from components.ops.plots import figure
from components.retrieval.retrieval import embed_with_tower
from components.serving.serving import PRODUCT_TOWER_ARTIFACT

SUMMARY = "drift.json"
SEARCH_REPORT = "searches.html"
CLICK_REPORT = "clicks.html"
CTR_PLOT = "ctr_by_position.png"
CTR_POSITIONS = 3  # the top positions whose click-through rate is watched


@dataclass
class DriftSummary:
    champion_version: str
    reference_days: list[int]
    current_days: list[int]
    drifted: bool = False
    signals: dict[str, dict[str, float | bool]] = field(default_factory=dict)
    champion_on_new_days: dict[str, float] = field(default_factory=dict)  # the whole window
    champion_on_its_test_days: dict[str, float] = field(default_factory=dict)
    champion_on_latest_days: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def drifted_signals(self) -> list[str]:
        return [name for name, s in self.signals.items() if s["drifted"]]


def champion_version(params: Params) -> tuple[str, dict[str, str]]:
    """(version, tags) of the registered champion; a clear error when there is none yet."""
    name = params.tracking.registered_model
    try:
        version = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        raise AceError(
            f"no `{CHAMPION}` of registered model {name!r} to monitor: run the pipeline first"
        ) from err
    missing = [t for t in (TRAIN_FIRST_DAY, TRAIN_LAST_DAY, LAST_DAY) if t not in version.tags]
    if missing:
        raise AceError(
            f"{name} version {version.version} has no {', '.join(missing)} tags (registered "
            "before monitoring existed): promote a new champion with the pipeline"
        )
    return str(version.version), dict(version.tags)


def oov_rate(queries: pd.Series, vocabulary: set[str]) -> np.ndarray:
    """Per query: the share of its words that are not whole tokens of the vocabulary."""
    words = queries.str.lower().str.split()
    return np.array([np.mean([w not in vocabulary for w in ws]) if ws else 0.0 for ws in words])


def ctr_by_position(impressions: pd.DataFrame) -> pd.Series:
    return impressions.groupby("position")["clicked"].mean()


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return frame.sample(n=min(n, len(frame)), random_state=seed).reset_index(drop=True)


def _embedding_frame(values: np.ndarray, prefix: str) -> pd.DataFrame:
    return pd.DataFrame(values, columns=[f"{prefix}{i}" for i in range(values.shape[1])])


def _evidently(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: list[str],
    categorical: list[str],
    embedding: str,
    params: Params,
    html: Path,
) -> dict[str, float]:
    """Column and embeddings drift scores by Evidently; the report saved as HTML."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.metrics.embeddings import ModelDriftMethod

    cfg = params.monitor
    embedding_columns = [c for c in reference.columns if c.startswith(f"{embedding}_")]
    definition = DataDefinition(
        numerical_columns=[c for c in columns if c not in categorical] + embedding_columns,
        categorical_columns=categorical,
        embeddings={embedding: embedding_columns},
    )
    metrics = [
        ValueDrift(column=c, method="jensenshannon", threshold=cfg.column_threshold)
        for c in columns
    ]
    method = ModelDriftMethod(threshold=cfg.embedding_threshold, bootstrap=False)
    metrics.append(EmbeddingsDrift(embeddings_name=embedding, drift_method=method))
    snapshot = Report(metrics).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    snapshot.save_html(str(html))
    values = [float(m["value"]) for m in snapshot.dict()["metrics"]]
    return dict(zip([*columns, f"{embedding}_embeddings"], values, strict=True))


def _plot_ctr(reference: pd.Series, current: pd.Series, path: Path) -> None:
    with figure(path, figsize=(5, 3.5)) as (fig, ax):
        ax.plot(
            reference.index, reference.to_numpy(), marker="o", label="reference (training days)"
        )
        ax.plot(current.index, current.to_numpy(), marker="o", label="new days")
        ax.set_xlabel("position")
        ax.set_ylabel("click-through rate")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()


def monitor(params: Params, out_dir: Path) -> DriftSummary:
    """Compare the new days with the champion's training days; write the reports and summary."""
    start = time.perf_counter()
    cfg = params.monitor
    artifacts = params.paths.artifacts_dir
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    version, tags = champion_version(params)
    impressions = validated_table(artifacts, "impressions")
    first, last, seen = (int(tags[t]) for t in (TRAIN_FIRST_DAY, TRAIN_LAST_DAY, LAST_DAY))
    reference = impressions[impressions["day"].between(first, last)]
    current = impressions[impressions["day"] > seen]
    summary = DriftSummary(
        champion_version=version,
        reference_days=sorted(int(d) for d in reference["day"].unique()),
        current_days=sorted(int(d) for d in current["day"].unique()),
    )
    if reference.empty:
        raise DataError(
            f"{artifacts / 'validate' / 'impressions.parquet'}: none of the champion's training "
            f"days {first}-{last} are in the click log"
        )
    if current.empty:
        summary.reason = f"no new days after day {seen}, the last the champion saw"
        _write(summary, out_dir)
        return summary

    name = params.tracking.registered_model
    served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").unwrap_python_model()
    retriever = served.retriever
    vocabulary = set(retriever.tokenizer.get_vocab())

    # Per search: query length, out-of-vocabulary rate, and the query's embedding as served.
    def searches(window: pd.DataFrame) -> pd.DataFrame:
        queries = _sample(window.drop_duplicates("search_id"), cfg.max_rows, cfg.seed)["query"]
        distinct = sorted(set(queries))
        vectors, _ = retriever.embed(distinct)
        row = {q: i for i, q in enumerate(distinct)}
        embedded = vectors[[row[q] for q in queries]]
        frame = pd.DataFrame(
            {
                "query_length": queries.str.split().str.len().to_numpy(),
                "oov_rate": oov_rate(queries, vocabulary),
            }
        )
        return pd.concat([frame, _embedding_frame(embedded, "query_")], axis=1)

    # Per click: the product's category, the click's position, the product's embedding.
    clicks = {
        "reference": _sample(reference[reference["clicked"] == 1], cfg.max_rows, cfg.seed),
        "current": _sample(current[current["clicked"] == 1], cfg.max_rows, cfg.seed),
    }
    variant = ModelConfig(variant=tags.get("variant", params.model.variant))
    tower = served.artifacts[PRODUCT_TOWER_ARTIFACT]
    product_emb = _embed_products(params, variant, tower, clicks)
    products = validated_table(artifacts, "products")
    category = dict(zip(products["product_id"], products["category"], strict=True))

    def click_frame(window: str) -> pd.DataFrame:
        frame = clicks[window]
        out = pd.DataFrame(
            {
                "category": frame["product_id"].map(category).to_numpy(),
                "click_position": frame["position"].to_numpy(),
            }
        )
        vectors = np.stack([product_emb[p] for p in frame["product_id"]])
        return pd.concat([out, _embedding_frame(vectors, "product_")], axis=1)

    scores = _evidently(
        searches(reference),
        searches(current),
        ["query_length", "oov_rate"],
        [],
        "query",
        params,
        out_dir / SEARCH_REPORT,
    )
    scores |= _evidently(
        click_frame("reference"),
        click_frame("current"),
        ["category", "click_position"],
        ["category"],
        "product",
        params,
        out_dir / CLICK_REPORT,
    )
    for signal, score in scores.items():
        threshold = (
            cfg.embedding_threshold if signal.endswith("embeddings") else cfg.column_threshold
        )
        summary.signals[signal] = {
            "score": score,
            "threshold": threshold,
            "drifted": score > threshold,
        }

    ctr_ref, ctr_cur = ctr_by_position(reference), ctr_by_position(current)
    _plot_ctr(ctr_ref, ctr_cur, out_dir / CTR_PLOT)
    top = [p for p in ctr_ref.index[:CTR_POSITIONS] if p in ctr_cur.index and ctr_ref[p] > 0]
    change = max((abs(ctr_cur[p] / ctr_ref[p] - 1) for p in top), default=0.0)
    summary.signals["ctr_by_position"] = {
        "score": float(change),
        "threshold": cfg.ctr_tolerance,
        "drifted": bool(change > cfg.ctr_tolerance),
    }

    # Decay like for like: the served champion on its own test days against the latest window
    # of the same length (recall over more days averages over more tail queries).
    window = int(tags.get("test_days", params.split.test_days))
    newest = int(current["day"].max())
    latest = current[current["day"] > newest - window]
    own_test = impressions[impressions["day"].between(last + 1, seen)]
    summary.champion_on_new_days = evaluate_served(retriever, current)
    summary.champion_on_its_test_days = evaluate_served(retriever, own_test)
    summary.champion_on_latest_days = evaluate_served(retriever, latest)
    for metric in ("gauc", "recall_at_100"):
        drop = summary.champion_on_its_test_days[metric] - summary.champion_on_latest_days[metric]
        summary.signals[f"decay_{metric}"] = {
            "score": float(drop),
            "threshold": cfg.decay_tolerance,
            "drifted": bool(drop > cfg.decay_tolerance),
        }
    drifted = summary.drifted_signals()
    summary.drifted = len(drifted) >= cfg.min_drifted_signals
    summary.reason = (
        f"drift: {', '.join(drifted)}" if summary.drifted else "no signal beyond its threshold"
    )
    summary.signals = {
        k: {**v, "score": round(float(v["score"]), 6)} for k, v in summary.signals.items()
    }
    _write(summary, out_dir, time.perf_counter() - start)
    return summary


def _embed_products(
    params: Params, variant: ModelConfig, tower_dir: str, clicks: dict[str, pd.DataFrame]
) -> dict[str, np.ndarray]:
    """The clicked products under the champion's product tower, new products included."""
    artifacts = params.paths.artifacts_dir
    products = validated_table(artifacts, "products")
    wanted = set(clicks["reference"]["product_id"]) | set(clicks["current"]["product_id"])
    embedded = embed_with_tower(
        Path(tower_dir),
        products[products["product_id"].isin(wanted)],
        FeatureStore(artifacts / "features"),
        variant,
        params.finetune.max_product_text_len,
        params.evaluate.batch_size,
        torch.device("cpu"),
        progress=False,
    )
    missing = wanted - set(embedded)
    if missing:
        raise DataError(
            f"{artifacts / 'features'}: no image features for {len(missing)} clicked products "
            f"(e.g. {sorted(missing)[0]}): run the features stage on the new data first"
        )
    return embedded


def _write(summary: DriftSummary, out_dir: Path, seconds: float = 0.0) -> None:
    record = asdict(summary) | {"drifted_signals": summary.drifted_signals(), "seconds": seconds}
    (out_dir / SUMMARY).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def metrics(summary: DriftSummary) -> dict[str, float]:
    """The summary as flat MLflow metrics."""
    out = {
        "drifted": float(summary.drifted),
        "new_days": float(len(summary.current_days)),
        "drifted_signals": float(len(summary.drifted_signals())),
    }
    for name, signal in summary.signals.items():
        out[f"{name}_score"] = float(signal["score"])
    for window in ("new_days", "its_test_days", "latest_days"):
        for name, value in getattr(summary, f"champion_on_{window}").items():
            out[f"champion_{window}_{name}"] = float(value)
    return out


def run_monitor(params: Params, parent_run_id: str | None = None) -> DriftSummary:
    """`monitor` as an MLflow run (nested under the retrain run): metrics, reports, summary."""
    out_dir = params.paths.artifacts_dir / "monitor"
    section = {"monitor": params.monitor.model_dump(mode="json")}
    with tracking.stage_run(params.tracking.experiment, "monitor", section, parent_run_id):
        summary = monitor(params, out_dir)
        mlflow.log_metrics(metrics(summary))
        mlflow.set_tags(
            {"drifted": str(summary.drifted), "champion_version": summary.champion_version}
        )
        for name in (SUMMARY, SEARCH_REPORT, CLICK_REPORT, CTR_PLOT):
            if (out_dir / name).exists():
                mlflow.log_artifact(str(out_dir / name), artifact_path="monitor")
    return summary


# Idempotent retraining: a retrain on the same data against the same champion happens once.
RETRAIN_KEY = "retrain_key"


def retrain_key(params: Params, champion: str) -> str:
    """What a retrain attempt is about: the data (version, rows, last day), the champion it
    challenges, the params and the code. Change any and it is a new attempt."""
    impressions = validated_table(params.paths.artifacts_dir, "impressions", columns=["day"])
    parts = [
        tracking.data_version(),
        str(len(impressions)),
        str(impressions["day"].max()),
        champion,
        params.model_dump_json(),
        tracking.git_commit(),
    ]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def earlier_attempt(params: Params, key: str) -> ModelVersion | None:
    """The model version an earlier retrain with this key registered, if any."""
    name = params.tracking.registered_model
    for version in MlflowClient().search_model_versions(f"name='{name}'"):
        if version.tags.get(RETRAIN_KEY) == key:
            return version
    return None


def mark_attempt(params: Params, version: str, key: str) -> None:
    MlflowClient().set_model_version_tag(
        params.tracking.registered_model, version, RETRAIN_KEY, key
    )
