"""Shared fixtures: a temporary MLflow store for every test, one tiny world per session."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from components.config import Params, load_params

ROOT = Path(__file__).resolve().parents[1]

# No telemetry or network from the tools under test.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Under pytest-xdist (`make test` runs one worker per core) each worker, and every process it
# starts (the `ace` and `dvc` commands), computes on one thread: two workers each spinning two
# OpenMP threads on two cores waste most of their time.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


# The longest files (measured: about 18 and 12 minutes on 2 cores), collected first so that
# under pytest-xdist (whole files per worker) they start at once and the other files fill the
# second worker meanwhile, instead of one of them starting last.
LONGEST_FIRST = ("test_retrain.py", "test_pipeline.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test tracks into its own SQLite store, never the user's mlruns/."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Also the process-wide URI: an earlier test's set_tracking_uri would otherwise win over
    # the environment for clients created before this test sets its own.
    mlflow.set_tracking_uri(uri)
    return uri


# The repo's params shrunk for tests: the tiny world and models that train in seconds.
TINY_OVERRIDES: dict[str, object] = {
    "profile": "small",
    "synth.scale": "tiny",
    "features.patch_input": 32,
    "features.variants": ["roi"],
    "pretrain.vocab_size": 400,
    "pretrain.hidden_size": 32,
    "pretrain.num_layers": 1,
    "pretrain.num_heads": 2,
    "pretrain.intermediate_size": 64,
    "pretrain.batch_size": 32,
    "pretrain.epochs": 1,
    "pretrain.warmup_steps": 2,
    "finetune.embedding_dim": 16,
    "finetune.max_query_len": 12,
    "finetune.max_product_text_len": 64,
    "finetune.partitions": 4,
    "finetune.batch_size": 16,
    "finetune.learning_rate": 2e-3,
    "finetune.epochs": 1,
    "finetune.warmup_steps": 2,
    "finetune.adversarial.classifier_hidden": 8,
    "evaluate.map_points": 60,
    "baselines.max_steps": 3,
}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy second core makes OpenMP spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_params() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def tiny_params(repo_params: Params, tmp_path_factory: pytest.TempPathFactory) -> Params:
    """The repo's params at the tiny scale, reading and writing under a temporary folder."""
    base = tmp_path_factory.mktemp("tiny")
    return make_params((TINY_OVERRIDES,), base / "artifacts", base / "data")


@pytest.fixture(scope="session")
def tiny_world(tiny_params: Params) -> Path:
    """A tiny synthetic world, generated once per session."""
    from components.data.world import generate_world

    generate_world(tiny_params.synth, tiny_params.paths.data_dir, progress=False)
    return tiny_params.paths.data_dir


def trained_overrides(artifacts: Path, data_dir: Path, **overrides: object) -> dict[str, object]:
    """Tiny overrides for a trained pipeline in `artifacts`: CPU, and a gate with no floors."""
    return {
        **TINY_OVERRIDES,
        "paths.data_dir": str(data_dir),
        "paths.artifacts_dir": str(artifacts),
        "model.variant": "cebert",
        "pretrain.num_layers": 2,
        "pretrain.device": "cpu",
        "finetune.device": "cpu",
        "evaluate.device": "cpu",
        "distill.device": "cpu",
        "gate.min_gauc": 0.0,
        "gate.min_recall_at_100": 0.0,
        "gate.min_student_fidelity": 0.0,
        **overrides,
    }


def make_params(
    layers: Sequence[Mapping[str, object]],
    artifacts: Path,
    data_dir: Path | None = None,
    **overrides: object,
) -> Params:
    """params.yaml writing under `artifacts` (and reading `data_dir`), with override layers applied
    in order and `overrides` last. A test module binds its layers once:
    `_params = partial(make_params, (TINY_OVERRIDES, MINE))`."""
    merged: dict[str, object] = {}
    for layer in layers:
        merged.update(layer)
    merged["paths.artifacts_dir"] = str(artifacts)
    if data_dir is not None:
        merged["paths.data_dir"] = str(data_dir)
    return load_params(ROOT / "params.yaml", {**merged, **overrides})


def trained_params(artifacts: Path, data_dir: Path, **overrides: object) -> Params:
    return make_params((trained_overrides(artifacts, data_dir, **overrides),), artifacts, data_dir)


# The image features of the trained world (tiny, CPU); incremental builds must use the same.
TRAINED_FEATURES = {
    "features.patch_input": 32,
    "features.variants": ["roi"],
    "features.samples_logged": 0,
    "features.device": "cpu",
}


@pytest.fixture(scope="session")
def trained_world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """validate -> features -> pretrain -> finetune -> evaluate -> distill -> index on the tiny
    world's first 100 products, once per session: the artifacts of the gate, refresh and
    search tests (which must not change them: copy first)."""
    import pandas as pd
    import torch

    from components.features.features import build_features
    from components.retrieval.evaluate import evaluate_retriever
    from components.retrieval.index import build as build_index
    from components.training.distill import distill
    from components.training.finetune import finetune
    from components.training.pretrain import pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    artifacts = tmp_path_factory.mktemp("trained_artifacts")
    products = pd.read_parquet(tiny_world / "products.parquet").head(100)
    impressions = pd.read_parquet(tiny_world / "impressions.parquet")
    impressions = impressions[impressions.product_id.isin(products.product_id)]
    (artifacts / "validate").mkdir()
    products.to_parquet(artifacts / "validate" / "products.parquet", index=False)
    impressions.to_parquet(artifacts / "validate" / "impressions.parquet", index=False)
    params = trained_params(artifacts, tiny_world, **TRAINED_FEATURES)
    build_features(products, tiny_world, artifacts / "features", params.features, progress=False)
    pretrain(params, artifacts / "pretrain", progress=False)
    finetune(params, artifacts / "finetune", progress=False)
    evaluate_retriever(params, artifacts / "evaluate", progress=False)
    distill(params, artifacts / "distill", progress=False)
    build_index(params, artifacts / "index", progress=False)
    torch.set_num_threads(threads)
    return artifacts
