"""The gate: register the candidate retriever in MLflow and promote it only if it earns it.

Like for like: candidate and champion are each judged on the path they serve (the registered
bundle: hot-query cache, then the distilled student, through the bundled index), on the same test
rows. "The same" is decided by a content hash of the test rows themselves (`test_rows_hash`), so
a champion from another test period, another data folder or untracked data is re-evaluated on the
current rows through its own bundle; only a champion judged on exactly these rows keeps its
recorded figures.

Checks, all in params.yaml `gate`:
- floors: the candidate's served GAUC and Recall@100 at least `min_gauc` / `min_recall_at_100`;
- fidelity: the student's Recall@100 at least `min_student_fidelity` of its teacher's (distill);
- no regression: neither served metric more than `tolerance` below the champion's.

A candidate identical to the champion (same student, product tower, index contents, settings and
test rows: `bundle_hash`) is not registered again. Every other candidate becomes a version (the
served pyfunc: components/serving/serving.py) tagged with its figures, hashes, data version, git
commit
and the verdict. One that passes takes the alias `champion`, and the version it replaces takes
`previous`; one that fails takes `challenger` only, and `failed_checks` says why. A failing
candidate is never promoted. The index refresh (components/serving/refresh.py) registers through the
same `judge`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.atomic import readable_dir
from components.config import Params
from components.data.clicklog import load_validated
from components.errors import DataError
from components.ops import tracking
from components.retrieval.evaluator import EmbeddingRanker, RetrievalEvaluator
from components.serving.serving import Retriever, log_retriever
from components.training.distill import SUMMARY as DISTILL_SUMMARY

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
GATED = ("gauc", "recall_at_100")
DECISION = "decision.json"
TRAIN_FIRST_DAY, TRAIN_LAST_DAY, LAST_DAY = "train_first_day", "train_last_day", "last_day"
TEST_ROWS_HASH, BUNDLE_HASH, FIDELITY = "test_rows_hash", "bundle_hash", "student_fidelity"
# The distill stage's figure the fidelity check reads.
DISTILL_FIDELITY = "student_over_teacher_recall_at_100"
# The click log's columns that make a test row; what else a table carries does not count.
ROW_COLUMNS = ("day", "search_id", "query", "product_id", "position", "clicked")
# Index files whose bytes define the served catalogue. The FAISS file is left out: it is built
# from these vectors and settings, and a multi-threaded HNSW build need not repeat byte for byte.
INDEX_CONTENT = ("product_embeddings.npy", "product_ids.json", "hot_cache.json", "hot_cache.npy")
REPORT = "_summary.json"


@dataclass
class Decision:
    version: str
    passed: bool
    candidate: dict[str, float]
    champion_version: str | None = None
    champion: dict[str, float] | None = None
    champion_reevaluated: bool = False
    failed_checks: list[str] = field(default_factory=list)
    identical_to_champion: bool = False  # then nothing was registered; `version` is the champion


def check(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    floors: dict[str, float],
    tolerance: float,
    fidelity: float | None = None,
    min_fidelity: float = 0.0,
) -> list[str]:
    """The failed checks' names: `floor:<metric>`, `fidelity:student`, `regression:<metric>`."""
    failed = [f"floor:{m}" for m, floor in floors.items() if candidate[m] < floor]
    if fidelity is not None and fidelity < min_fidelity:
        failed.append("fidelity:student")
    if champion is not None:
        failed += [f"regression:{m}" for m in GATED if candidate[m] < champion[m] - tolerance]
    return failed


def hash_test_rows(test: pd.DataFrame) -> str:
    """A content hash of the test rows: the same rows give the same hash wherever they are read
    from and in whatever order, and any added, dropped or changed row changes it."""
    columns = [c for c in ROW_COLUMNS if c in test.columns]
    rows = test[columns].sort_values(columns, kind="stable").reset_index(drop=True)
    digest = hashlib.sha256(rows.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return digest.hexdigest()


def _hash_files(digest: Any, root: Path, names: Iterable[str] | None = None) -> None:
    """Feed each file's relative path and bytes; a folder's training reports (`*_summary.json`,
    which carry timings) are not the model and are left out."""
    root = readable_dir(root)
    if names is None:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(REPORT))
    else:
        files = [root / name for name in names]
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(path.read_bytes())


def bundle_hash(
    student_dir: Path, index_dir: Path, product_tower_dir: Path, settings: dict, rows_hash: str
) -> str:
    """What makes two candidates the same: the student's and the product tower's files, the
    index's contents (INDEX_CONTENT), the serving settings and the test rows."""
    digest = hashlib.sha256()
    for part, root, names in (
        ("student", student_dir, None),
        ("product_tower", product_tower_dir, None),
        ("index", index_dir, INDEX_CONTENT),
    ):
        digest.update(part.encode("utf-8") + b"\0")
        _hash_files(digest, Path(root), names)
    digest.update(json.dumps(settings, sort_keys=True).encode("utf-8"))
    digest.update(rows_hash.encode("utf-8"))
    return digest.hexdigest()


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


def student_fidelity(student_dir: Path) -> float:
    """The student's Recall@100 over its teacher's, as distill measured it (its summary)."""
    summary_file = Path(student_dir) / DISTILL_SUMMARY
    if not summary_file.exists():
        raise DataError(f"{summary_file}: no distilled student to gate (run distill)")
    metrics = json.loads(summary_file.read_text(encoding="utf-8"))["metrics"]
    return float(metrics[DISTILL_FIDELITY])


def served_figures(model_uri: str, test: pd.DataFrame) -> dict[str, float]:
    """`evaluate_served` of a logged or registered bundle, loaded as it is served."""
    served = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return evaluate_served(served.retriever, test)


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None  # no model yet


def judge(
    params: Params,
    model_uri: str,
    test: pd.DataFrame,
    fidelity: float | None,
    tags: dict[str, object],
    out_dir: Path,
) -> Decision:
    """Register `model_uri`, judge it on `test` like for like against the champion, move the
    aliases, and write the decision (see the module doc)."""
    cfg, name, client = params.gate, params.tracking.registered_model, MlflowClient()
    rows_hash = hash_test_rows(test)
    candidate = served_figures(model_uri, test)
    current = current_champion(client, name)
    version = str(mlflow.register_model(model_uri, name).version)
    recorded = {**{m: candidate[m] for m in GATED}, TEST_ROWS_HASH: rows_hash, **tags}
    if fidelity is not None:
        recorded[FIDELITY] = fidelity
    for key, value in recorded.items():
        client.set_model_version_tag(name, version, key, str(value))

    decision = Decision(version=version, passed=False, candidate=candidate)
    if current is not None:
        decision.champion_version = str(current.version)
        known = current.tags.get(TEST_ROWS_HASH) == rows_hash and all(
            m in current.tags for m in GATED
        )
        if known:
            decision.champion = {m: float(current.tags[m]) for m in GATED}
        else:
            decision.champion = served_figures(f"models:/{name}/{current.version}", test)
            decision.champion_reevaluated = True
    floors = {"gauc": cfg.min_gauc, "recall_at_100": cfg.min_recall_at_100}
    decision.failed_checks = check(
        candidate, decision.champion, floors, cfg.tolerance, fidelity, cfg.min_student_fidelity
    )
    decision.passed = not decision.failed_checks

    if decision.passed:
        if decision.champion_version is not None:
            client.set_registered_model_alias(name, PREVIOUS, decision.champion_version)
        client.set_registered_model_alias(name, CHAMPION, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    verdict = "passed" if decision.passed else "failed"
    client.set_model_version_tag(name, version, "gate", verdict)
    client.set_model_version_tag(
        name, version, "failed_checks", ",".join(decision.failed_checks) or "none"
    )
    mlflow.set_tags({"gate": verdict, "model_version": version})
    write_decision(decision, out_dir)
    return decision


def write_decision(decision: Decision, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DECISION).write_text(json.dumps(asdict(decision), indent=2) + "\n", encoding="utf-8")


def decision_metrics(decision: Decision) -> dict[str, float]:
    """The stage's metrics: verdict, version, and both sides' gated figures."""
    result = {
        "passed": float(decision.passed),
        "version": float(decision.version),
        "registered": float(not decision.identical_to_champion),
    }
    result.update({f"candidate_{m}": decision.candidate[m] for m in GATED})
    if decision.champion is not None:
        result.update({f"champion_{m}": decision.champion[m] for m in GATED})
    return result


def gate(params: Params, out_dir: Path) -> dict[str, float]:
    artifacts = params.paths.artifacts_dir
    student_dir, index_dir = artifacts / "distill" / "student", artifacts / "index"
    tower_dir = artifacts / "finetune" / "model"
    fidelity = student_fidelity(student_dir)
    periods = load_validated(params).periods
    test = periods.test
    limits, max_query_len = params.serving.limits, params.finetune.max_query_len
    settings = {"max_query_len": max_query_len, "limits": limits.model_dump()}
    identity = bundle_hash(student_dir, index_dir, tower_dir, settings, hash_test_rows(test))

    current = current_champion(MlflowClient(), params.tracking.registered_model)
    if current is not None and current.tags.get(BUNDLE_HASH) == identity:
        # `ace/full` on unchanged data: nothing new to register or promote.
        figures = {m: float(current.tags[m]) for m in GATED}
        decision = Decision(
            version=str(current.version),
            passed=True,
            candidate=figures,
            champion_version=str(current.version),
            champion=figures,
            identical_to_champion=True,
        )
        mlflow.set_tags({"gate": "identical to the champion", "model_version": decision.version})
        write_decision(decision, out_dir)
        return decision_metrics(decision)

    info = log_retriever(
        student_dir, index_dir, max_query_len, Path(out_dir), limits, product_tower_dir=tower_dir
    )
    # Drift monitoring's reference: the days the champion was built from, trained on and
    # selected on (the validation days), i.e. every day before its test period.
    built_from = pd.concat([periods.train, periods.val])
    tags = {
        BUNDLE_HASH: identity,
        "data_version": tracking.data_version(),
        "test_days": params.split.test_days,
        TRAIN_FIRST_DAY: int(built_from["day"].min()),
        TRAIN_LAST_DAY: int(built_from["day"].max()),
        LAST_DAY: int(test["day"].max()),
        "git_commit": tracking.git_commit(),
        "variant": params.model.variant,
    }
    decision = judge(params, info.model_uri, test, fidelity, tags, out_dir)
    return decision_metrics(decision)
