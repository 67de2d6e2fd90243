"""`ace compare`: every variant and every baseline, mean and spread over seeds, on the same rows.

Reads one experiment's `evaluate` runs (ace's variants) and `baselines` runs (BM25 and the
sentence-transformers models, components/retrieval/baselines.py), by default of the current data
version
only (numbers from different worlds do not compare). Per (variant, seed) the newest run counts and
older ones are counted as superseded (a re-run replaces a run, it does not add a seed). Figures
are the test days' (`period="test"`) or the validation days' (`period="val"`: what choices are
made on). Two tables: the whole-catalogue figures, and the slices (image: the title omits or
misstates the colour/pattern the query asks for; text: the other clicks; cold: products without
a training click). The semantic-matching loss curves with and without the adversary are the
paper's Fig. 6.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from components.errors import AceError
from components.ops import tracking
from components.ops.plots import figure
from components.retrieval.baselines import NAMES as BASELINES
from components.retrieval.evaluator import PERIOD_PREFIX

METRICS = ("gauc", "recall_at_10", "recall_at_50", "recall_at_100", "mrr", "ndcg_at_10")
SLICE_METRICS = tuple(
    f"{s}_{m}" for s in ("image", "text", "cold") for m in ("gauc", "recall_at_10", "recall_at_100")
)
VARIANT_ORDER = (
    *BASELINES,
    "twinbert",
    "fashionbert",
    "cebert",
    "cebert_hot",
    "cebert_adv",
    "acebert",
    "acebert_ma",
    "acebert_ke",
    "make",
)
# Fig. 6 pairs: the same model without and with the adversary.
ADVERSARIAL_PAIRS = (("cebert_hot", "acebert"), ("cebert", "cebert_adv"))


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per model: seeds, <metric>_mean, <metric>_std
    runs: pd.DataFrame  # the runs used, one per (model, seed)
    period: str = "test"
    superseded: int = 0  # older runs of a (model, seed) that a newer one replaced

    def markdown(self, metrics: tuple[str, ...] = METRICS) -> str:
        header = "| model | seeds | " + " | ".join(metrics) + " |"
        lines = [header, "|" + "---|" * (len(metrics) + 2)]
        for model, row in self.table.iterrows():
            seeds = int(row["seeds"])
            cells = [
                _cell(row.get(f"{m}_mean", np.nan), row.get(f"{m}_std", np.nan), seeds)
                for m in metrics
            ]
            lines.append(f"| {model} | {seeds} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def report(self) -> str:
        """Both tables, with a line on what they are."""
        note = f"{self.period} days; mean ± standard deviation over seeds"
        if self.superseded:
            note += f"; {self.superseded} older re-runs of a (model, seed) superseded"
        out = [f"Whole catalogue ({note}):", "", self.markdown()]
        if any(f"{m}_mean" in self.table for m in SLICE_METRICS):
            out += ["Slices (image: only the image tells; cold: no training click):", ""]
            out.append(self.markdown(SLICE_METRICS))
        return "\n".join(out)


def _cell(mean: float, std: float, seeds: int) -> str:
    if np.isnan(mean):
        return "-"
    return f"{mean:.4f}" if seeds < 2 else f"{mean:.4f} ± {std:.4f}"


def _runs(client: MlflowClient, experiment_id: str, stage: str, data_version: str | None) -> list:
    query = f"tags.stage = '{stage}'"
    if data_version:
        query += f" and tags.data_version = '{data_version}'"
    return client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]
    )


def compare(experiment: str, data_version: str | None, period: str = "test") -> Comparison:
    if period not in PERIOD_PREFIX:
        raise AceError(f"period {period!r}: one of {', '.join(PERIOD_PREFIX)}")
    prefix = PERIOD_PREFIX[period]
    wanted = METRICS + SLICE_METRICS
    experiment_id = tracking.use_experiment(experiment)
    client = MlflowClient()
    rows = []
    seen: set[tuple[str, str]] = set()
    superseded = 0
    for stage, seed_param in (("evaluate", "finetune.seed"), ("baselines", "baselines.seed")):
        for run in _runs(client, experiment_id, stage, data_version):
            seed = run.data.params.get(seed_param)
            names = [run.data.params.get("model.variant")] if stage == "evaluate" else BASELINES
            for name in names:
                if name is None:
                    continue
                head = "" if stage == "evaluate" else f"{name}_"
                metrics = {m: run.data.metrics.get(f"{prefix}{head}{m}") for m in wanted}
                if all(v is None for v in metrics.values()):
                    continue  # a run from before these figures existed
                if (name, seed) in seen:  # newest first: an older run is superseded
                    superseded += 1
                    continue
                seen.add((name, seed))
                rows.append({"model": name, "seed": seed, "run_id": run.info.run_id, **metrics})
    if not rows:
        scope = f" for data version {data_version}" if data_version else ""
        raise AceError(f"no evaluate runs in experiment {experiment!r}{scope}: run the pipeline")
    runs = pd.DataFrame(rows)
    grouped = runs.groupby("model")
    table = pd.DataFrame({"seeds": grouped["seed"].nunique()})
    for metric in wanted:
        values = pd.to_numeric(runs[metric], errors="coerce")
        table[f"{metric}_mean"] = values.groupby(runs["model"]).mean()
        table[f"{metric}_std"] = values.groupby(runs["model"]).std(ddof=1).fillna(0.0)
    order = [v for v in VARIANT_ORDER if v in table.index]
    order += sorted(set(table.index) - set(order))
    return Comparison(table=table.loc[order], runs=runs, period=period, superseded=superseded)


def write(comparison: Comparison, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "compare.md", out_dir / "compare.json"
    md.write_text(comparison.report(), encoding="utf-8")
    payload = {
        model: {key: float(value) for key, value in row.items() if not pd.isna(value)}
        for model, row in comparison.table.iterrows()
    }
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return [md, js]


def plot_adversarial_curves(experiment: str, data_version: str | None, path: Path) -> bool:
    """Paper Fig. 6: semantic-matching loss per step, without vs with the adversary (mean over
    seeds, smoothed). False when no finetune run of a pair's variants exists."""

    experiment_id = tracking.use_experiment(experiment)
    client = MlflowClient()
    curves: dict[str, list[np.ndarray]] = {}
    seen: set[tuple[str, str]] = set()
    for run in _runs(client, experiment_id, "finetune", data_version):
        variant, seed = run.data.params.get("model.variant"), run.data.params.get("finetune.seed")
        if variant is None or (variant, seed) in seen:
            continue
        seen.add((variant, seed))
        history = client.get_metric_history(run.info.run_id, "train/main_loss")
        if history:
            values = np.array([m.value for m in sorted(history, key=lambda m: m.step)])
            curves.setdefault(variant, []).append(values)
    pairs = [p for p in ADVERSARIAL_PAIRS if all(v in curves for v in p)]
    if not pairs:
        return False
    with figure(path, 1, len(pairs), figsize=(5 * len(pairs), 3.5), squeeze=False) as (fig, axes):
        for ax, pair in zip(axes[0], pairs, strict=True):
            for variant in pair:
                length = min(len(c) for c in curves[variant])
                mean = np.mean([c[:length] for c in curves[variant]], axis=0)
                width = max(1, length // 40)
                smooth = np.convolve(mean, np.ones(width) / width, mode="valid")
                adversary = "with" if variant in ("acebert", "cebert_adv") else "without"
                label = f"{variant} ({adversary} adv.)"
                ax.plot(np.arange(width, length + 1), smooth, label=label)
            ax.set_xlabel("step")
            ax.set_ylabel("semantic matching loss (Eq. 5)")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
    return True
