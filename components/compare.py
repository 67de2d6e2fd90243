"""`ace compare`: every variant's offline metrics from the MLflow runs, mean and spread over seeds.

Reads the `evaluate` stage runs of one experiment (and, by default, of the current data version:
numbers from different worlds do not compare), keeps the newest run per (variant, fine-tuning
seed), and aggregates per variant. BM25 is one more row: it does not depend on the variant, so
its figures are taken from every evaluate run (their spread is 0 on one data version). The
semantic-matching loss curves of the finetune runs, with and without adversarial learning, are
drawn as the paper's Fig. 6.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from components import tracking
from components.errors import AceError

METRICS = ("gauc", "recall_at_10", "recall_at_50", "recall_at_100", "mrr", "ndcg_at_10")
VARIANT_ORDER = ("bm25", "twinbert", "fashionbert", "cebert", "cebert_hot", "cebert_adv", "acebert")
# Fig. 6 pairs: the same model without and with the adversary.
ADVERSARIAL_PAIRS = (("cebert_hot", "acebert"), ("cebert", "cebert_adv"))


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per variant: n_seeds, <metric>_mean, <metric>_std
    runs: pd.DataFrame  # the evaluate runs used

    def markdown(self) -> str:
        header = "| variant | seeds | " + " | ".join(METRICS) + " |"
        lines = [header, "|" + "---|" * (len(METRICS) + 2)]
        for variant, row in self.table.iterrows():
            cells = [
                f"{row[f'{m}_mean']:.4f} ± {row[f'{m}_std']:.4f}"
                if not np.isnan(row[f"{m}_mean"])
                else "-"
                for m in METRICS
            ]
            lines.append(f"| {variant} | {int(row['seeds'])} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _runs(client: MlflowClient, experiment_id: str, stage: str, data_version: str | None) -> list:
    query = f"tags.stage = '{stage}'"
    if data_version:
        query += f" and tags.data_version = '{data_version}'"
    return client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]
    )


def compare(experiment: str, data_version: str | None) -> Comparison:
    experiment_id = tracking.use_experiment(experiment)
    client = MlflowClient()
    rows = []
    seen: set[tuple[str, str]] = set()
    for run in _runs(client, experiment_id, "evaluate", data_version):
        variant = run.data.params.get("model.variant")
        seed = run.data.params.get("finetune.seed")
        if variant is None or (variant, seed) in seen:
            continue  # newest first: an older run of the same variant and seed is superseded
        seen.add((variant, seed))
        metrics = run.data.metrics
        rows.append({"variant": variant, "seed": seed, "run_id": run.info.run_id, **metrics})
    if not rows:
        scope = f" for data version {data_version}" if data_version else ""
        raise AceError(f"no evaluate runs in experiment {experiment!r}{scope}: run the pipeline")
    runs = pd.DataFrame(rows)
    bm25 = runs[[f"bm25_{m}" for m in METRICS if f"bm25_{m}" in runs]].copy()
    bm25.columns = [c.removeprefix("bm25_") for c in bm25.columns]
    bm25["variant"], bm25["seed"] = "bm25", runs["seed"]
    everything = pd.concat([runs[["variant", "seed", *METRICS]], bm25], ignore_index=True)
    grouped = everything.groupby("variant")
    table = pd.DataFrame({"seeds": grouped["seed"].nunique()})
    for metric in METRICS:
        table[f"{metric}_mean"] = grouped[metric].mean()
        table[f"{metric}_std"] = grouped[metric].std(ddof=1).fillna(0.0)
    order = [v for v in VARIANT_ORDER if v in table.index]
    return Comparison(table=table.loc[order], runs=runs)


def write(comparison: Comparison, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "compare.md", out_dir / "compare.json"
    md.write_text(comparison.markdown(), encoding="utf-8")
    payload = {
        variant: {key: float(value) for key, value in row.items()}
        for variant, row in comparison.table.iterrows()
    }
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return [md, js]


def plot_adversarial_curves(experiment: str, data_version: str | None, path: Path) -> bool:
    """Paper Fig. 6: semantic-matching loss per step, without vs with the adversary (mean over
    seeds, smoothed). False when no finetune run of a pair's variants exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.5), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        for variant in pair:
            length = min(len(c) for c in curves[variant])
            mean = np.mean([c[:length] for c in curves[variant]], axis=0)
            width = max(1, length // 40)
            smooth = np.convolve(mean, np.ones(width) / width, mode="valid")
            label = (
                f"{variant} ({'with' if variant in ('acebert', 'cebert_adv') else 'without'} adv.)"
            )
            ax.plot(np.arange(width, length + 1), smooth, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("semantic matching loss (Eq. 5)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
