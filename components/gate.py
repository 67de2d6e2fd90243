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
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import tracking
from components.config import Params
from components.errors import DataError
from components.evaluate import METRICS_FILE
from components.retrieval import split_days
from components.retrieval_metrics import gauc, ranking_metrics, relevant_sets
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


def evaluate_served(retriever: Retriever, test: pd.DataFrame) -> dict[str, float]:
    """GAUC and Recall@100 of a served retriever on these impressions (exact definitions).

    Products its index lacks (new since it was built) count against it, as a shopper would see
    it: they score the lowest cosine, -1, in GAUC and are misses in Recall@100.
    """
    test = test.reset_index(drop=True)
    known = test["product_id"].isin(set(retriever.product_ids)).to_numpy()
    scores = np.full(len(test), -1.0)
    if known.any():
        scores[known] = retriever.score_pairs(
            list(test.loc[known, "query"]), list(test.loc[known, "product_id"])
        )
    value, _ = gauc(test, scores)
    index_of = {pid: i for i, pid in enumerate(retriever.product_ids)}
    catalogue = dict(index_of)
    for pid in test.loc[~known, "product_id"].unique():
        catalogue[pid] = len(catalogue)  # rows no search can return
    queries, relevant = relevant_sets(test, None, catalogue)
    depth = min(100, len(index_of))
    found = retriever.search(queries, [depth] * len(queries))
    top = np.array(
        [[index_of[p] for p in ids] + [-1] * (depth - len(ids)) for ids in found["product_ids"]]
    )
    ranking = ranking_metrics(top, relevant, (depth,), catalog_size=len(catalogue))
    clicked = test["clicked"].astype(bool).to_numpy()
    return {
        "gauc": value,
        "recall_at_100": ranking[f"recall@{depth}"],
        "clicks_on_products_not_indexed": float((clicked & ~known).sum() / max(1, clicked.sum())),
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
    train, test = split_days(impressions, params.split.test_days, params.split.train_days)
    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, name).version
    for key, value in {
        **candidate,
        "data_version": data_version,
        "test_days": params.split.test_days,
        # The windows drift monitoring compares new days against.
        TRAIN_FIRST_DAY: int(train["day"].min()),
        TRAIN_LAST_DAY: int(train["day"].max()),
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
