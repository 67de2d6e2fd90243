"""What every training loop shares: optimiser groups, step seeds, step logging, schedules."""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlflow
import numpy as np
from torch import nn

log = logging.getLogger(__name__)


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    head_learning_rate: float | None,
    weight_decay: float,
    is_head: Callable[[str], bool],
    skip: Callable[[str], bool] = lambda name: False,
) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases and LayerNorms, as BERT), and
    `head_learning_rate` for the parameters `is_head` names (the layers a pretrained checkpoint
    did not provide, which must move faster than its weights); None = `learning_rate`."""
    head_lr = learning_rate if head_learning_rate is None else head_learning_rate
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if skip(name) or not parameter.requires_grad:
            continue
        groups.setdefault((is_head(name), parameter.ndim >= 2), []).append(parameter)
    return [
        {
            "params": params,
            "lr": head_lr if head else learning_rate,
            "weight_decay": weight_decay if decayed else 0.0,
        }
        for (head, decayed), params in sorted(groups.items())
    ]


def step_seed(seed: int, stream: int, step: int) -> int:
    """The seed of one step's random draws (dropout) in a stream of the run's: a resumed run
    needs no saved RNG state."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0])


def log_step(step: int, record: dict[str, float]) -> None:
    """Per-step figures to the active MLflow run (the stage's), if any."""
    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"train/{k}": v for k, v in record.items()}, step=step)


def check_schedule(stage: str, warmup_steps: int, total_steps: int) -> int:
    """The warm-up to use: a warm-up longer than the run would train it at a fraction of its
    learning rate throughout, so it is cut to a tenth of the run, with a warning."""
    if warmup_steps < total_steps:
        return warmup_steps
    cut = max(1, total_steps // 10)
    log.warning(
        "%s: warm-up of %d steps >= the run's %d steps (a small catalogue?): using %d",
        stage,
        warmup_steps,
        total_steps,
        cut,
    )
    return cut
