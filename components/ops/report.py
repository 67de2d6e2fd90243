"""The short human summary of a pipeline run: `ace report`, the end of `make demo`, and the
markdown the Prefect flow publishes as its run's artifact.

It reads what the stages committed (the evaluate and gate metrics under `paths.metrics_dir`) and
the registry's champion. Evaluate's figures are read by their names
(components/retrieval/evaluator.py):
`<model>_<slice>_<metric>` for the headline metrics (GAUC, Recall@K, MRR, nDCG@K), where the
trained model has no model part and a baseline its name (`bm25`, `st_zeroshot_title`, ...), so
whichever baselines evaluate measured are compared. Validation-period figures (`val_`) and
exact-search ones (`exact_`: the same model without its index) are not the report's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache

from components.config import Params

# The headline metric names, in the order tables show them.
HEADLINE = ("gauc", "recall_at_10", "recall_at_50", "recall_at_100", "mrr", "ndcg_at_10")
TITLES = {
    "gauc": "GAUC",
    "recall_at_10": "Recall@10",
    "recall_at_50": "Recall@50",
    "recall_at_100": "Recall@100",
    "mrr": "MRR",
    "ndcg_at_10": "nDCG@10",
}
_KEY = re.compile(r"^(?P<prefix>(?:[a-z0-9]+_)*?)(?P<metric>gauc|mrr|recall_at_\d+|ndcg_at_\d+)$")
IMAGE = "image"  # the slice where only the image tells (BRIEF.md): shown beside the whole set
CHAMPION = "champion"  # the registry alias the gate promotes to (docs/serving.md)


@cache
def _names() -> tuple[frozenset[str], frozenset[str]]:
    """The evaluator's query sets besides the whole test set (its slices, and a judged query set's
    `judged_` figures), and the name parts of figures the report leaves out."""
    from components.retrieval.evaluator import PERIOD_PREFIX, SLICES

    periods = {prefix.rstrip("_") for prefix in PERIOD_PREFIX.values() if prefix}
    return frozenset({*SLICES, "judged"}), frozenset({*periods, "exact"})


@dataclass(frozen=True)
class ModelFigures:
    name: str  # "" for the trained model, else the baseline's name
    slice: str  # "" for every test query, else the slice's name
    figures: dict[str, float] = field(default_factory=dict)


def split_key(key: str) -> tuple[str, str, str] | None:
    """'bm25_image_recall_at_100' -> ('bm25', 'image', 'recall_at_100'); None for a key that is
    not a headline test figure."""
    match = _KEY.match(key)
    if match is None:
        return None
    slices, left_out = _names()
    parts = [p for p in match["prefix"].split("_") if p]
    if left_out & set(parts):
        return None
    slice_ = next((p for p in parts if p in slices), "")
    return "_".join(p for p in parts if p != slice_), slice_, match["metric"]


def model_figures(metrics: dict[str, float]) -> list[ModelFigures]:
    """Evaluate's metrics as one row per (model, slice): the whole test set first, the trained
    model before the baselines (by name)."""
    rows: dict[tuple[str, str], ModelFigures] = {}
    for key, value in metrics.items():
        parsed = split_key(key)
        if parsed is None:
            continue
        name, slice_, metric = parsed
        rows.setdefault((name, slice_), ModelFigures(name, slice_)).figures[metric] = float(value)
    order = sorted(rows, key=lambda k: (k[1] != "", k[1], k[0] != "", k[0]))
    return [rows[k] for k in order]


def metric_order(rows: list[ModelFigures]) -> list[str]:
    present = {m for row in rows for m in row.figures}
    extra = sorted(present - set(HEADLINE))
    return [m for m in HEADLINE if m in present] + extra


# One row per model, the image slice's figures as `image_<metric>` columns: the variant
# comparison DVC draws (`dvc plots diff` puts each experiment's bars side by side).
COMPARISON_COLUMNS = ("model", *HEADLINE, *(f"{IMAGE}_{m}" for m in HEADLINE))


def comparison_rows(metrics: dict[str, float], variant: str) -> list[dict[str, object]]:
    """The trained model (named by its variant) and each baseline (by its name)."""
    rows: dict[str, dict[str, object]] = {}
    for figures in model_figures(metrics):
        if figures.slice not in ("", IMAGE):
            continue
        row = rows.setdefault(figures.name, {"model": figures.name or variant})
        for metric, value in figures.figures.items():
            row[f"{IMAGE}_{metric}" if figures.slice else metric] = value
    return list(rows.values())


def _markdown_table(rows: list[ModelFigures], variant: str) -> list[str]:
    order = metric_order(rows)
    lines = [
        "| model | " + " | ".join(TITLES.get(m, m) for m in order) + " |",
        "|---|" + "---:|" * len(order),
    ]
    from components.retrieval.baselines import LABELS

    for row in rows:
        name = f"**{variant}**" if row.name == "" else LABELS.get(row.name, row.name)
        cells = [f"{row.figures[m]:.3f}" if m in row.figures else "-" for m in order]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def against_rivals(rows: list[ModelFigures], slice_: str = "") -> list[str]:
    """Per metric: the trained model minus the strongest baseline, and which one that is."""
    model = next((r for r in rows if r.name == "" and r.slice == slice_), None)
    rivals = [r for r in rows if r.slice == slice_ and r.name != ""]
    if model is None or not rivals:
        return []
    parts = []
    for metric in metric_order([model]):
        scored = [(r.figures[metric], r.name) for r in rivals if metric in r.figures]
        if not scored:
            continue
        best, name = max(scored)
        parts.append(f"{TITLES.get(metric, metric)} {model.figures[metric] - best:+.3f} ({name})")
    return parts


def stage_metrics(params: Params, stage: str) -> dict[str, float] | None:
    """What the stage last committed to its metrics file (None before its first run)."""
    from components.stages import get_stage

    path = get_stage(stage).metrics_file(params)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _gated(figures: dict[str, float] | dict[str, str], prefix: str = "") -> str:
    """The gated figures (metrics, or a model version's tags) as 'GAUC 0.751, Recall@100 ...'."""
    shown = [(m, figures.get(f"{prefix}{m}")) for m in ("gauc", "recall_at_100")]
    return ", ".join(f"{TITLES[m]} {float(value):.3f}" for m, value in shown if value is not None)


def registry_lines(params: Params) -> list[str]:
    """The gate's last decision (its metrics, its version's tags) and the champion the registry
    holds now: what `ace search` and `mlflow models serve` load."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from components.ops import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client, name = MlflowClient(), params.tracking.registered_model
    gate = stage_metrics(params, "gate")
    lines = []
    if gate is None:
        lines.append("Gate: not run yet.")
    else:
        version, passed = int(gate["version"]), bool(gate["passed"])
        verdict = "passed: promoted to champion" if passed else "failed: not promoted"
        line = f"Gate: version {version} {verdict} ({_gated(gate, 'candidate_')})"
        if not gate.get("registered", 1):
            line = (
                f"Gate: the candidate is identical to champion version {version} "
                "(weights, index, settings, test rows): not registered again"
            )
        elif "champion_gauc" in gate:
            line += f" against the champion it challenged ({_gated(gate, 'champion_')})"
        if not passed:
            try:
                checks = client.get_model_version(name, str(version)).tags.get("failed_checks")
            except MlflowException:
                checks = None
            line += f"; failed checks: {checks}" if checks else ""
        lines.append(line + ".")
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return [*lines, f"Champion: none yet (`models:/{name}@{CHAMPION}` is not set)."]
    tags = champion.tags
    about = [tags.get("variant", "unknown variant"), _gated(tags)]
    if "data_version" in tags:
        about.append(f"data {tags['data_version']}")
    uri = f"models:/{name}@{CHAMPION}"
    return [
        *lines,
        f"Champion: `{uri}` is version {champion.version} ({'; '.join(a for a in about if a)}).",
    ]


def render(params: Params) -> str:
    """The summary as markdown (also plain enough to read in a terminal)."""
    variant = params.model.variant
    lines = [f"## ace: {variant} on the test days", ""]
    metrics = stage_metrics(params, "evaluate")
    if metrics is None:
        lines.append("No evaluation yet: run the pipeline (`dvc repro`) first.")
    else:
        rows = model_figures(metrics)
        whole = [r for r in rows if r.slice == ""]
        lines += _markdown_table(whole, variant)
        if "n_products" in metrics and "queries" in metrics:
            lines += [
                "",
                f"{int(metrics['queries'])} test queries, Recall@K over the whole "
                f"catalogue of {int(metrics['n_products'])} products.",
            ]
        ahead = against_rivals(rows)
        if ahead:
            lines += ["", "Against the strongest baseline: " + ", ".join(ahead) + "."]
        sliced = [r for r in rows if r.slice == IMAGE]
        if sliced:
            count = f"{int(metrics[f'{IMAGE}_queries'])} " if f"{IMAGE}_queries" in metrics else ""
            lines += [
                "",
                f"Image slice ({count}queries whose clicked titles omit or misstate the colour "
                "or pattern: only the image tells):",
                "",
                *_markdown_table(sliced, variant),
            ]
            ahead = against_rivals(rows, IMAGE)
            if ahead:
                lines += ["", "Against the strongest baseline there: " + ", ".join(ahead) + "."]
    lines += ["", *registry_lines(params)]
    return "\n".join(lines) + "\n"
