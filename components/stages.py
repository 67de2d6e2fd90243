"""The one stage registry: `dvc.yaml` is rendered from it and the Prefect flow iterates it.

Each stage is one function `(params) -> metrics`. Its declaration names the params.yaml sections it
reads and the paths it depends on and writes, so adding a stage is one entry here plus
`ace pipeline dvc-yaml` to refresh dvc.yaml (a test fails while the two disagree).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import yaml

from components.config import Params
from components.data import contract
from components.data.clicklog import validated_table
from components.errors import AceError
from components.ops import plot_data, report, tracking
from components.training import distributed

Metrics = dict[str, float]
_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PlotData:
    """A file or folder of CSVs a stage writes under `paths.plots_dir` for DVC."""

    path: str
    # Set: DVC draws every CSV in it as a chart of its own against this column. None: only the
    # charts in CHARTS draw it.
    x: str | None = None


# The model-against-baselines table evaluate writes, and the charts DVC draws from it.
COMPARISON = "models.csv"
CHARTS = {
    "GAUC by model": "gauc",
    "Recall@10 by model": "recall_at_10",
    "Recall@100 by model": "recall_at_100",
    "Recall@100 on the image slice, by model": "image_recall_at_100",
}


def code_files(modules: tuple[str, ...], root: Path = _ROOT) -> list[str]:
    """The source files of these modules and of every `components` module they import, directly
    or not (module- or function-level imports, read from the source, nothing executed): the
    code whose change must re-run a stage, so dvc.yaml cannot miss one."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        path = source_file(module, root)
        if module in seen or path is None:
            continue
        seen.add(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo.append(node.module)  # from components.x import y
                todo += [f"{node.module}.{alias.name}" for alias in node.names]  # a submodule
    files = {source_file(m, root) for m in seen if m.split(".")[0] == "components"}
    # An empty __init__.py is no code; one that defines names is.
    return sorted(str(f.relative_to(root)) for f in files if f and f.stat().st_size > 0)


def source_file(module: str, root: Path = _ROOT) -> Path | None:
    """The file of a module (`a/b.py`) or package (`a/b/__init__.py`) under root, if any."""
    stem = root / module.replace(".", "/")
    for path in (stem.with_suffix(".py"), stem / "__init__.py"):
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Params], Metrics]
    params: tuple[str, ...]  # params.yaml sections (or single dotted keys) the stage reads
    # The modules that do the stage's work; their import closure within `components` is the
    # code whose change must re-run it (`code_files`).
    modules: tuple[str, ...]
    deps: Callable[[Params], list[Path]]
    outs: Callable[[Params], list[Path]]
    description: str
    # Outputs DVC keeps in place across runs: the stage reuses what is still valid in them.
    persist: bool = False
    # Trains data-parallel under torchrun (every rank runs it); other stages run on rank 0 only.
    distributed: bool = False
    plots: tuple[PlotData, ...] = ()

    def metrics_file(self, params: Params) -> Path:
        # In git, not under artifacts/: `dvc exp show` and `dvc metrics diff` read every
        # experiment's metrics from its commit.
        return params.paths.metrics_dir / f"{self.name}.json"


def stage_dir(params: Params, name: str) -> Path:
    return params.paths.artifacts_dir / name


def _features(params: Params) -> Metrics:
    from components.features.features import build_features

    products = validated_table(params.paths.artifacts_dir, "products")
    truth_file = params.paths.data_dir / contract.TRUTH_DIR / "products.parquet"
    truth = pd.read_parquet(truth_file) if truth_file.exists() else None  # diagnostics only
    out_dir = stage_dir(params, "features")
    report = build_features(products, params.paths.data_dir, out_dir, params.features, truth)
    for name in ("samples.png", "manifest.json", "failed.parquet"):
        if (out_dir / name).exists():
            mlflow.log_artifact(str(out_dir / name), artifact_path="features")
    return report.metrics()


def _validate(params: Params) -> Metrics:
    from components.data.validate import validate_data

    out_dir = stage_dir(params, "validate")
    report = validate_data(params.paths.data_dir, out_dir, params.validate_)
    for name in ("quarantine.parquet", "validation.json"):
        if (out_dir / name).exists():
            mlflow.log_artifact(str(out_dir / name), artifact_path="validate")
    mlflow.log_dict(dict(report.reasons), "validate/quarantine_reasons.json")
    return report.metrics()


def _log_training(name: str, out_dir: Path, model_dir: str, files: tuple[str, ...]) -> None:
    """A training stage's model folder, history and curve, under the stage's name in MLflow."""
    mlflow.log_artifacts(str(out_dir / model_dir), artifact_path=f"{name}/model")
    for file in files:
        mlflow.log_artifact(str(out_dir / file), artifact_path=name)


def _training_curves(params: Params, name: str, out_dir: Path, history_file: str) -> None:
    history = json.loads((out_dir / history_file).read_text(encoding="utf-8"))
    plot_data.write_training_curves(history, params.paths.plots_dir / name)


def _pretrain(params: Params) -> Metrics:
    from components.training.pretrain import CURVE, HISTORY, MODEL_DIR, pretrain

    out_dir = stage_dir(params, "pretrain")
    metrics = pretrain(params, out_dir)
    if distributed.is_main():
        _log_training("pretrain", out_dir, MODEL_DIR, (HISTORY, CURVE))
        _training_curves(params, "pretrain", out_dir, HISTORY)
    return metrics


def _finetune(params: Params) -> Metrics:
    from components.training.finetune import CURVE, HISTORY, MODEL_DIR, finetune

    out_dir = stage_dir(params, "finetune")
    metrics = finetune(params, out_dir)
    if distributed.is_main():
        _log_training("finetune", out_dir, MODEL_DIR, (HISTORY, CURVE))
        _training_curves(params, "finetune", out_dir, HISTORY)
    return metrics


def _baselines(params: Params) -> Metrics:
    from components.retrieval.baselines import RESULTS_FILE, run_baselines

    out_dir = stage_dir(params, "baselines")
    metrics = run_baselines(params, out_dir)
    mlflow.log_artifact(str(out_dir / RESULTS_FILE), artifact_path="baselines")
    return metrics


def _evaluate(params: Params) -> Metrics:
    from components.retrieval.evaluate import (
        EMBEDDING_MAP,
        METRICS_FILE,
        RECALL_CURVE,
        WEIGHTS,
        evaluate_retriever,
    )

    out_dir = stage_dir(params, "evaluate")
    metrics = evaluate_retriever(params, out_dir)
    for name in (METRICS_FILE, RECALL_CURVE, EMBEDDING_MAP, WEIGHTS):
        if (out_dir / name).exists():
            mlflow.log_artifact(str(out_dir / name), artifact_path="evaluate")
    rows = report.comparison_rows(metrics, params.model.variant)
    plot_data.write_table(rows, report.COMPARISON_COLUMNS, params.paths.plots_dir / COMPARISON)
    return metrics


def _distill(params: Params) -> Metrics:
    from components.training.distill import STUDENT_DIR, distill

    out_dir = stage_dir(params, "distill")
    metrics = distill(params, out_dir)
    mlflow.log_artifacts(str(out_dir / STUDENT_DIR), artifact_path="distill/student")
    return metrics


def _index(params: Params) -> Metrics:
    from components.retrieval.index import MANIFEST, build

    out_dir = stage_dir(params, "index")
    metrics = build(params, out_dir)
    mlflow.log_artifact(str(out_dir / MANIFEST), artifact_path="index")
    return metrics


def _gate(params: Params) -> Metrics:
    from components.ops.gate import DECISION, gate

    out_dir = stage_dir(params, "gate")
    metrics = gate(params, out_dir)
    mlflow.log_artifact(str(out_dir / DECISION), artifact_path="gate")
    return metrics


STAGES: tuple[Stage, ...] = (
    Stage(
        name="validate",
        run=_validate,
        params=("validate",),
        modules=("components.data.validate",),
        deps=lambda p: [p.paths.data_dir],
        outs=lambda p: [stage_dir(p, "validate")],
        description="Check products and impressions with Great Expectations; quarantine bad rows.",
    ),
    Stage(
        name="features",
        run=_features,
        params=("features",),
        modules=("components.features.features",),
        deps=lambda p: [stage_dir(p, "validate"), p.paths.data_dir],
        outs=lambda p: [stage_dir(p, "features")],
        description="RoI by edge detection, CNN patch features, pixel tokens: the image tokens.",
        persist=True,
    ),
    Stage(
        name="baselines",
        run=_baselines,
        params=("split", "baselines", "index", "evaluate.ks", "finetune.hot_queries"),
        modules=("components.retrieval.baselines",),
        deps=lambda p: [stage_dir(p, n) for n in ("validate", "features")],
        outs=lambda p: [stage_dir(p, "baselines")],
        description="BM25 and sentence-transformers baselines (zero-shot, fine-tuned), same rows.",
    ),
    Stage(
        name="pretrain",
        run=_pretrain,
        params=("model", "split", "pretrain"),
        modules=("components.training.pretrain",),
        deps=lambda p: [stage_dir(p, "validate"), stage_dir(p, "features")],
        outs=lambda p: [stage_dir(p, "pretrain")],
        description="CE-BERT pre-training: MLM + masked patch KL + text-image prediction.",
        distributed=True,
        plots=(PlotData("pretrain", x="step"),),
    ),
    Stage(
        name="finetune",
        run=_finetune,
        params=("model", "split", "finetune"),
        modules=("components.training.finetune",),
        deps=lambda p: [stage_dir(p, n) for n in ("validate", "features", "pretrain")],
        outs=lambda p: [stage_dir(p, "finetune")],
        description="ACE-BERT fine-tuning: two towers, in-batch softmax, mixed negatives.",
        distributed=True,
        plots=(PlotData("finetune", x="step"),),
    ),
    Stage(
        name="evaluate",
        run=_evaluate,
        params=("model", "split", "finetune", "evaluate", "index"),
        modules=("components.retrieval.evaluate",),
        deps=lambda p: [stage_dir(p, n) for n in ("validate", "features", "finetune", "baselines")],
        outs=lambda p: [stage_dir(p, "evaluate")],
        description="GAUC, Recall@K (ANN and exact), MRR, nDCG@10, slices; beside the baselines.",
        plots=(PlotData(plot_data.RECALL, x="k"), PlotData(COMPARISON)),
    ),
    Stage(
        name="distill",
        run=_distill,
        params=("model", "split", "finetune", "evaluate", "distill", "index"),
        modules=("components.training.distill",),
        deps=lambda p: [stage_dir(p, n) for n in ("validate", "features", "finetune", "evaluate")],
        outs=lambda p: [stage_dir(p, "distill")],
        description="A shallower query tower distilled from the fine-tuned one (paper 4.7).",
    ),
    Stage(
        name="index",
        run=_index,
        params=("split", "finetune", "evaluate", "index"),
        modules=("components.retrieval.index",),
        deps=lambda p: [stage_dir(p, n) for n in ("validate", "features", "finetune", "evaluate")],
        outs=lambda p: [stage_dir(p, "index")],
        description="FAISS product index and the hot-query cache, swapped in atomically.",
    ),
    Stage(
        name="gate",
        run=_gate,
        params=("model", "split", "finetune", "gate", "tracking", "serving"),
        modules=("components.ops.gate", "components.serving.served_model"),  # logged from its code
        deps=lambda p: [stage_dir(p, n) for n in ("validate", "finetune", "distill", "index")],
        outs=lambda p: [stage_dir(p, "gate")],
        description="Judge the served bundle like for like; promote it only if it passes.",
    ),
)


def get_stage(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise AceError(f"unknown stage {name!r}; stages are: {', '.join(s.name for s in STAGES)}")


def run_stage(stage: Stage, params: Params, parent_run_id: str | None = None) -> Metrics:
    """Run one stage as an MLflow run (nested under `parent_run_id`) and write its metrics.

    Under torchrun, ranks other than 0 only train (data-parallel stages) and record nothing."""
    if not distributed.is_main():
        return stage.run(params) if stage.distributed else {}
    section_params = {name: params.value(name) for name in stage.params}
    section_params["profile"] = params.profile or "none"
    with tracking.stage_run(
        params.tracking.experiment, stage.name, section_params, parent_run_id=parent_run_id
    ):
        metrics = stage.run(params)
        mlflow.log_metrics(metrics)
    # Timings differ run to run: they stay in MLflow, so dvc.lock only changes when results do.
    stable = {key: value for key, value in metrics.items() if not key.endswith("seconds")}
    metrics_file = stage.metrics_file(params)
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(stable, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return metrics


def render_dvc_yaml(params: Params) -> str:
    """dvc.yaml as the registry declares it: every stage runs through the same `ace stage run`.

    Metrics and plot data are `cache: false` outputs: git keeps them, so every experiment's
    commit holds its own. CHARTS are top-level plots over the model comparison.
    """
    plots_dir = params.paths.plots_dir
    stages = {}
    for stage in STAGES:
        outs: list[object] = [
            {str(path): {"persist": True}} if stage.persist else str(path)
            for path in stage.outs(params)
        ]
        outs += [
            {str(plots_dir / plot.path): {"cache": False}} for plot in stage.plots if not plot.x
        ]
        entry = {
            "cmd": f"ace stage run {stage.name}",
            "deps": [*code_files(stage.modules), *(str(path) for path in stage.deps(params))],
            # A profile may set any section: every stage re-runs when it changes.
            "params": [*stage.params, "profile", "profiles"],
            "outs": outs,
            "metrics": [{str(stage.metrics_file(params)): {"cache": False}}],
        }
        charts = [
            {str(plots_dir / plot.path): {"cache": False, "x": plot.x}}
            for plot in stage.plots
            if plot.x
        ]
        if charts:
            entry["plots"] = charts
        stages[stage.name] = entry
    comparison = str(plots_dir / COMPARISON)
    charts = [
        {
            title: {
                "template": "bar_horizontal",
                "x": metric,
                "y": {comparison: "model"},
                "x_label": metric,
                "y_label": "model",
            }
        }
        for title, metric in CHARTS.items()
    ]
    header = "# Rendered from components/stages.py by `ace pipeline dvc-yaml`; edit the registry.\n"
    return header + yaml.safe_dump({"stages": stages, "plots": charts}, sort_keys=False)
