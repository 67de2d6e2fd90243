"""Products are searchable the day they arrive: the champion's index grows without a retrain.

`ace index refresh` (and the daily deployment `ace/refresh`) takes the products the validated
catalogue holds and the champion's index lacks, embeds them with the product tower bundled with
the champion (their image features come from the features stage, which only computes what is
new), and adds them to a copy of the champion's index, published whole under
`artifacts/refresh/index`. The champion's query tower, hot-query cache and settings are reused
as they are, so a refreshed bundle answers every old product exactly as before.

The refreshed bundle is registered as a new version through the gate's `judge`, like any
candidate: on the current test rows, like for like against the champion (which is charged for
the clicks on products it lacks), with the student's fidelity and the floors. The served index
changes only when the registry moves the `champion` alias, in one step: a refresh that crashes
at any point leaves the previous champion serving. The refreshed version keeps the champion's
training windows, so the monitor keeps judging the same new days, now with every product in the
index.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from components.config import ModelConfig, Params, ServingLimits
from components.data.clicklog import split_days, validated_table
from components.errors import AceError, DataError
from components.features.backbones import resolve_device
from components.features.features import FeatureStore
from components.ops import tracking
from components.ops.gate import (
    BUNDLE_HASH,
    LAST_DAY,
    TRAIN_FIRST_DAY,
    TRAIN_LAST_DAY,
    bundle_hash,
    current_champion,
    decision_metrics,
    hash_test_rows,
    judge,
    student_fidelity,
)
from components.retrieval.index import extend
from components.retrieval.retrieval import embed_with_tower
from components.serving.serving import (
    INDEX_ARTIFACT,
    PRODUCT_TOWER_ARTIFACT,
    SETTINGS_ARTIFACT,
    SETTINGS_FILE,
    STUDENT_ARTIFACT,
    log_retriever,
)

REFRESHED_FROM = "refreshed_from"
# The champion's tags a refreshed version keeps: what it was trained on and how it was built.
KEPT_TAGS = (TRAIN_FIRST_DAY, TRAIN_LAST_DAY, LAST_DAY, "test_days", "variant", "git_commit")


def refresh(params: Params, out_dir: Path, progress: bool = True) -> dict[str, float]:
    """Add the products the champion's index lacks; register and judge the refreshed bundle."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    name = params.tracking.registered_model
    champion = current_champion(MlflowClient(), name)
    if champion is None:
        raise AceError(
            f"no `champion` of registered model {name!r} to refresh: run the pipeline first"
        )
    served = mlflow.pyfunc.load_model(f"models:/{name}/{champion.version}").unwrap_python_model()
    bundle = {key: Path(path) for key, path in served.artifacts.items()}
    if PRODUCT_TOWER_ARTIFACT not in bundle:
        raise AceError(
            f"champion version {champion.version} bundles no product tower to embed new "
            "products with: retrain (`ace pipeline run`) to refresh it"
        )
    artifacts = params.paths.artifacts_dir
    products = validated_table(artifacts, "products")
    new = products[~products["product_id"].isin(set(served.retriever.product_ids))]
    figures = {
        "champion_version": float(champion.version),
        "champion_products": float(len(served.retriever.product_ids)),
        "products_added": float(len(new)),
    }
    if new.empty:
        return {**figures, "registered": 0.0, "seconds": time.perf_counter() - start}

    embedding = time.perf_counter()
    embedded = embed_with_tower(
        bundle[PRODUCT_TOWER_ARTIFACT],
        new,
        FeatureStore(artifacts / "features"),
        ModelConfig(variant=champion.tags.get("variant", params.model.variant)),
        params.finetune.max_product_text_len,
        params.evaluate.batch_size,
        resolve_device(params.evaluate.device),
        progress=progress,
    )
    missing = sorted(set(new["product_id"]) - set(embedded))
    if missing:
        raise DataError(
            f"{artifacts / 'features'}: no image features for {len(missing)} new products "
            f"(e.g. {missing[0]}): run the features stage on the new data first"
        )
    new_ids = sorted(embedded)
    embed_seconds = time.perf_counter() - embedding
    index_dir = out_dir / "index"
    extend(bundle[INDEX_ARTIFACT], new_ids, np.stack([embedded[i] for i in new_ids]), index_dir)

    settings_file = bundle[SETTINGS_ARTIFACT] / SETTINGS_FILE
    settings = json.loads(settings_file.read_text(encoding="utf-8"))
    limits = ServingLimits.model_validate(settings.get("limits", {}))
    max_query_len = int(settings["max_query_len"])
    impressions = validated_table(artifacts, "impressions")
    test_rows = split_days(impressions, params.split).test
    identity = bundle_hash(
        bundle[STUDENT_ARTIFACT],
        index_dir,
        bundle[PRODUCT_TOWER_ARTIFACT],
        {"max_query_len": max_query_len, "limits": limits.model_dump()},
        hash_test_rows(test_rows),
    )
    info = log_retriever(
        bundle[STUDENT_ARTIFACT],
        index_dir,
        max_query_len,
        out_dir,
        limits,
        product_tower_dir=bundle[PRODUCT_TOWER_ARTIFACT],
    )
    tags: dict[str, object] = {key: champion.tags[key] for key in KEPT_TAGS if key in champion.tags}
    tags |= {
        BUNDLE_HASH: identity,
        REFRESHED_FROM: champion.version,
        "products_added": len(new_ids),
        "data_version": tracking.data_version(),
    }
    decision = judge(
        params, info.model_uri, test_rows, student_fidelity(bundle[STUDENT_ARTIFACT]), tags, out_dir
    )
    return {
        **figures,
        **decision_metrics(decision),
        "embed_seconds": embed_seconds,
        "seconds": time.perf_counter() - start,
    }


def run_refresh(params: Params, parent_run_id: str | None = None) -> dict[str, float]:
    """`refresh` as an MLflow run (nested under the flow's run when given)."""
    out_dir = params.paths.artifacts_dir / "refresh"
    section = {"refresh": params.refresh.model_dump(mode="json"), "gate": params.gate.model_dump()}
    with tracking.stage_run(params.tracking.experiment, "refresh", section, parent_run_id):
        metrics = refresh(params, out_dir)
        mlflow.log_metrics(metrics)
    return metrics
