"""The gate: register the candidate retriever in MLflow and promote it only if it earns it.

Checks, all in params.yaml `gate`:
- floors: the candidate's GAUC and Recall@100 (evaluate stage, test days) at least `min_gauc`
  and `min_recall_at_100`;
- no regression: neither metric more than `tolerance` below the current champion's **on the same
  test data**. When the champion was registered on another data version (a retrain on new days),
  it is re-evaluated here on the current test days through its own bundled index and query
  tower, the way it would serve.

The registered model is `tracking.registered_model` (`ace`). Every candidate becomes a version
(the served pyfunc: components/serving.py) tagged with its metrics, data version, git commit and
the gate's verdict. A candidate that passes takes the alias `champion`, and the version it
replaces takes `previous`; one that fails takes `challenger` only, and `failed_checks` says why.
A failing candidate is never promoted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import tracking
from components.clicklog import split_days
from components.config import Params
from components.errors import DataError
from components.evaluate import METRICS_FILE
from components.evaluator import EmbeddingRanker, RetrievalEvaluator
from components.serving import Retriever, log_retriever

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
GATED = ("gauc", "recall_at_100")
DECISION = "decision.json"
TRAIN_FIRST_DAY, TRAIN_LAST_DAY, LAST_DAY = "train_first_day", "train_last_day", "last_day"


@dataclass
class Decision:
    version: str
    passed: bool
    candidate: dict[str, float]
    champion_version: str | None = None
    champion: dict[str, float] | None = None
    champion_reevaluated: bool = False
    failed_checks: list[str] = field(default_factory=list)


def check(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    floors: dict[str, float],
    tolerance: float,
) -> list[str]:
    """The failed checks' names: `floor:<metric>` and `regression:<metric>`."""
    failed = [f"floor:{m}" for m, floor in floors.items() if candidate[m] < floor]
    if champion is not None:
        failed += [f"regression:{m}" for m in GATED if candidate[m] < champion[m] - tolerance]
    return failed


def evaluate_served(retriever: Retriever, impressions: pd.DataFrame) -> dict[str, float]:
    """GAUC and Recall@100 of a served retriever on these impressions, through its own query
    path (hot cache, then student) and its own index, by the one evaluator.

    Products its index lacks (new since it was built) count against it, as a shopper would see
    it: they are part of the evaluated catalogue, so they score below everything in GAUC and
    are misses in Recall@100.
    """
    known = set(retriever.product_ids)
    unknown = sorted(set(impressions["product_id"]) - known)
    evaluator = RetrievalEvaluator(impressions, [*retriever.product_ids, *unknown], ks=(100,))
    ranker = EmbeddingRanker(
        retriever.product_ids,
        retriever.product_vectors,
        lambda queries: retriever.embed(queries)[0],
        retriever.index,
    )
    figures = evaluator(ranker, exact=False)
    clicked = impressions["clicked"].astype(bool)
    lacking = clicked & ~impressions["product_id"].isin(known)
    return {
        "gauc": figures["gauc"],
        "recall_at_100": figures["recall_at_100"],
        "clicks_on_products_not_indexed": float(lacking.sum() / max(1, clicked.sum())),
    }


def gate(params: Params, out_dir: Path) -> dict[str, float]:
    cfg = params.gate
    artifacts = params.paths.artifacts_dir
    metrics_file = artifacts / "evaluate" / METRICS_FILE
    if not metrics_file.exists():
        raise DataError(f"{metrics_file}: no evaluation of the candidate (run evaluate)")
    evaluated = json.loads(metrics_file.read_text(encoding="utf-8"))
    candidate = {m: float(evaluated[m]) for m in GATED}
    name = params.tracking.registered_model
    data_version = tracking.data_version()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    info = log_retriever(
        artifacts / "distill" / "student",
        artifacts / "index",
        params.finetune.max_query_len,
        out_dir,
        limits=params.serving.limits,
        product_tower_dir=artifacts / "finetune" / "model",
    )
    impressions = pd.read_parquet(artifacts / "validate" / "impressions.parquet")
    periods = split_days(impressions, params.split)
    # Drift monitoring's reference: the days the champion was built from, trained on and
    # selected on (the validation days), i.e. every day before its test period.
    built_from = pd.concat([periods.train, periods.val])
    test = periods.test
    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, name).version
    for key, value in {
        **candidate,
        "data_version": data_version,
        "test_days": params.split.test_days,
        # The windows drift monitoring compares new days against.
        TRAIN_FIRST_DAY: int(built_from["day"].min()),
        TRAIN_LAST_DAY: int(built_from["day"].max()),
        LAST_DAY: int(test["day"].max()),
        "git_commit": tracking.git_commit(),
        "variant": params.model.variant,
    }.items():
        client.set_model_version_tag(name, version, key, str(value))

    decision = Decision(version=str(version), passed=False, candidate=candidate)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None  # the first model ever
    if current is not None and str(current.version) != str(version):
        decision.champion_version = str(current.version)
        tags = current.tags
        same_data = tags.get("data_version") == data_version and tags.get("test_days") == str(
            params.split.test_days
        )
        if same_data and all(m in tags for m in GATED):
            decision.champion = {m: float(tags[m]) for m in GATED}
        else:
            served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
            decision.champion = evaluate_served(served.unwrap_python_model().retriever, test)
            decision.champion_reevaluated = True
    floors = {"gauc": cfg.min_gauc, "recall_at_100": cfg.min_recall_at_100}
    decision.failed_checks = check(candidate, decision.champion, floors, cfg.tolerance)
    decision.passed = not decision.failed_checks

    if decision.passed:
        if decision.champion_version is not None:
            client.set_registered_model_alias(name, PREVIOUS, decision.champion_version)
        client.set_registered_model_alias(name, CHAMPION, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, "gate", "passed" if decision.passed else "failed")
    client.set_model_version_tag(
        name, version, "failed_checks", ",".join(decision.failed_checks) or "none"
    )
    mlflow.set_tags(
        {"gate": "passed" if decision.passed else "failed", "model_version": str(version)}
    )
    (out_dir / DECISION).write_text(json.dumps(asdict(decision), indent=2) + "\n", encoding="utf-8")
    result = {"passed": float(decision.passed), "version": float(version)}
    result.update({f"candidate_{m}": v for m, v in candidate.items()})
    if decision.champion is not None:
        result.update({f"champion_{m}": v for m, v in decision.champion.items()})
    return result
