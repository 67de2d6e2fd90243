"""The daily index refresh against a full index build, at demo scale, in the same run.

    python benchmarks/bench_refresh.py --project DIR   # DIR: a project after `make demo`

For 1% and 10% of the catalogue taken as "new" (a seeded draw), an index over the other products
plays the champion's. Then, alternating, `repeats` times each:
- refresh: embed the new products with the fine-tuned product tower (image features read from
  the feature store, as the refresh does after the features stage) and add them to a copy of
  that index, published atomically (components/retrieval/index.py `extend`);
- full build: embed the whole catalogue and build and publish a new index of the same type (what
  evaluate + index do for it).
It also times one end-to-end `refresh` per fraction: a champion bundle registered in a scratch
MLflow store, then load, embed, extend, log the new bundle and judge it like for like against
the champion on the test rows (the gate's served-path evaluation of both). Prints a table and
writes benchmarks/results/refresh.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from components.config import Params, load_params
from components.features.backbones import resolve_device
from components.features.features import FeatureStore
from components.retrieval.ann import build_index
from components.retrieval.index import extend, load, publish_index
from components.retrieval.retrieval import embed_with_tower
from components.serving.refresh import refresh
from components.serving.serving import log_retriever

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    project = args.project.resolve()
    os.chdir(project)
    params = load_params(project / "params.yaml")
    artifacts = params.paths.artifacts_dir.resolve()
    tower = artifacts / "finetune" / "model"
    store = FeatureStore(artifacts / "features")
    products = pd.read_parquet(artifacts / "validate" / "products.parquet")
    device = resolve_device(params.evaluate.device)
    _, ids, manifest, hot, hot_emb = load(artifacts / "index")
    vectors = np.load(artifacts / "index" / "product_embeddings.npy")
    row = {pid: i for i, pid in enumerate(ids)}

    def embed(frame: pd.DataFrame) -> dict[str, np.ndarray]:
        return embed_with_tower(
            tower,
            frame,
            store,
            params.model,
            params.finetune.max_product_text_len,
            params.evaluate.batch_size,
            device,
            progress=False,
        )

    work = Path(tempfile.mkdtemp(prefix="bench_refresh_"))
    rng = np.random.default_rng(args.seed)
    results: dict[str, dict[str, float]] = {}

    def full_build() -> float:
        start = time.perf_counter()
        embedded = embed(products)
        all_ids = sorted(embedded)
        all_vectors = np.stack([embedded[i] for i in all_ids])
        built = build_index(all_vectors, params.index)
        publish_index(work / "full", built, all_ids, manifest, hot, hot_emb, all_vectors)
        return time.perf_counter() - start

    full_times: list[float] = []
    for share in (0.01, 0.10):
        new_ids = sorted(rng.choice(ids, max(1, round(share * len(ids))), replace=False))
        new = set(new_ids)
        old_ids = [i for i in ids if i not in new]
        old_vectors = vectors[[row[i] for i in old_ids]]
        base = work / f"champion_{share}"
        publish_index(
            base,
            build_index(old_vectors, params.index),
            old_ids,
            manifest,
            hot,
            hot_emb,
            old_vectors,
        )

        def refresh_only(new: set[str] = new, base: Path = base) -> float:
            start = time.perf_counter()
            embedded = embed(products[products["product_id"].isin(new)])
            added = sorted(embedded)
            extend(base, added, np.stack([embedded[i] for i in added]), work / "refreshed")
            return time.perf_counter() - start

        refresh_only()  # warm-up: the tower's first load
        times: list[float] = []
        for r in range(args.repeats):
            if r % 2:
                full_times.append(full_build())
                times.append(refresh_only())
            else:
                times.append(refresh_only())
                full_times.append(full_build())
        end_to_end = _end_to_end(params, artifacts, base, work / f"run_{share}")
        results[f"{round(100 * share)}%"] = {
            "new_products": float(len(new_ids)),
            "refresh_seconds": statistics.median(times),
            "end_to_end_refresh_seconds": end_to_end,
        }
    full = statistics.median(full_times)
    for row_ in results.values():
        row_["full_build_seconds"] = full
        row_["full_over_refresh"] = full / row_["refresh_seconds"]
    result = {
        "catalogue": len(ids),
        "index_type": params.index.type,
        "results": results,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }
    print(f"catalogue {len(ids)} products, {params.index.type} index; medians of {args.repeats}")
    print(f"{'new':>5s} {'products':>9s} {'refresh s':>10s} {'full build s':>13s} {'ratio':>7s} "
          f"{'end-to-end s':>13s}")  # fmt: skip
    for name, r in results.items():
        print(
            f"{name:>5s} {int(r['new_products']):9d} {r['refresh_seconds']:10.2f} "
            f"{r['full_build_seconds']:13.2f} {r['full_over_refresh']:6.1f}x "
            f"{r['end_to_end_refresh_seconds']:13.1f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "refresh.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _end_to_end(params: Params, artifacts: Path, champion_index: Path, work: Path) -> float:
    """One `refresh` against a champion whose index is `champion_index`, in a scratch store."""
    work.mkdir(parents=True)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("bench-refresh")
    name = params.tracking.registered_model
    with mlflow.start_run():
        info = log_retriever(
            artifacts / "distill" / "student",
            champion_index,
            params.finetune.max_query_len,
            work,
            params.serving.limits,
            product_tower_dir=artifacts / "finetune" / "model",
        )
        version = mlflow.register_model(info.model_uri, name).version
        MlflowClient().set_registered_model_alias(name, "champion", version)
    start = time.perf_counter()
    with mlflow.start_run():
        figures = refresh(params, work / "refresh", progress=False)
    assert figures["registered"], figures
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
