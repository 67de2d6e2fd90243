"""The one Trainer of pre-training, fine-tuning and distillation.

A stage describes its run as a `Schedule` (steps, learning rates, clipping, checkpoints,
validation) and its work as a `TrainingTask` (one step's loss and the hooks it needs); the Trainer
owns everything else, once:

- AdamW with BERT's parameter groups (no weight decay on biases and LayerNorms) and a learning
  rate of its own for the layers a pretrained checkpoint lacks (`head_learning_rate`), linear
  warm-up then decay (a warm-up longer than the run is cut, with a warning), gradient clipping;
- every random draw a function of (seed, step): the dropout of step s is seeded from
  (seed, stream, s) before its forward, so a run resumed from a checkpoint needs no RNG state and
  reproduces the uninterrupted run's losses exactly (same device and thread count);
- checkpoints every `checkpoint_every` steps (weights, optimiser, scheduler, the task's own
  states, history; written aside and renamed in) and exact resume;
- validation every `eval_every` steps with early stopping: the best weights by `select_metric`
  are kept aside and restored at the end; training stops after `patience` evaluations without
  improvement;
- MLflow step logging (`train/*`), a progress line in the log every `log_every` steps (what a
  Prefect task log shows), and a tqdm bar;
- data parallelism under `torchrun` (components/training/distributed.py): the task computes its loss
on
  the whole global batch (gathering embeddings from every rank), gradients are averaged across
  ranks, and only rank 0 logs, evaluates and writes;
- mixed precision: bf16 autocast when `precision` is bf16, or auto on CUDA; fp32 otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from components.config import FinetuneConfig, PretrainConfig
from components.training import checkpoints, distributed

log = logging.getLogger(__name__)

BEST_DIR = "best"  # under the checkpoints: the weights of the best validation so far


@dataclass(frozen=True)
class Schedule:
    """What the Trainer needs to know of a stage's run."""

    name: str  # the stage: progress bar, log lines, warnings
    total_steps: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    seed: int
    dropout_stream: int  # the stage's random stream for step seeds
    head_learning_rate: float | None = None
    checkpoint_every: int = 0  # 0: never
    eval_every: int = 0  # 0: never validate
    patience: int = 0  # 0: never stop early
    select_metric: str = ""  # the validation figure that picks the best checkpoint
    log_every: int = 50  # a progress line in the log every N steps
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 on CUDA, else fp32)

    @classmethod
    def of_section(
        cls, name: str, cfg: PretrainConfig | FinetuneConfig, total_steps: int, dropout_stream: int
    ) -> Schedule:
        """The schedule a training section of params.yaml (pretrain, finetune) describes."""
        return cls(
            name=name,
            total_steps=total_steps,
            learning_rate=cfg.learning_rate,
            head_learning_rate=cfg.head_learning_rate,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup_steps,
            grad_clip=cfg.grad_clip,
            seed=cfg.seed,
            dropout_stream=dropout_stream,
            checkpoint_every=cfg.checkpoint_every,
            precision=cfg.precision,
        )


class TrainingTask:
    """One stage's steps. `loss` is required; the hooks default to doing nothing."""

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float], int]:
        """Forward one step: (loss to minimise, figures to log, samples in the global batch)."""
        raise NotImplementedError

    def trained_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """What the Trainer's optimiser updates and clips (default: every parameter)."""
        return list(model.named_parameters())

    def after_update(self, step: int) -> dict[str, float]:
        """Work after the optimiser step (e.g. the adversary's classifier); figures to log."""
        return {}

    def can_checkpoint(self) -> bool:
        """False while the task holds state a checkpoint would not capture."""
        return True

    def states(self) -> dict[str, Any]:
        """Extra state dicts a checkpoint must hold (e.g. a second optimiser)."""
        return {}

    def load_states(self, states: dict[str, Any]) -> None:
        pass

    def validate(self, step: int) -> dict[str, float]:
        """Validation figures (`val_*`), only called when the schedule validates."""
        return {}


def is_head_default(name: str) -> bool:
    return False


class Trainer:
    """The optimisation loop of every training stage (see the module doc)."""

    def __init__(
        self,
        model: nn.Module,
        task: TrainingTask,
        schedule: Schedule,
        device: torch.device,
        tokenizer: PreTrainedTokenizerBase | None = None,
        checkpoint_root: Path | None = None,
        fingerprint: str = "",
        is_head: Callable[[str], bool] = is_head_default,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        """`on_step(step, figures)` receives every logged record (default: MLflow)."""
        self.model, self.task, self.schedule, self.device = model, task, schedule, device
        self.tokenizer, self.checkpoint_root = tokenizer, checkpoint_root
        self.fingerprint = fingerprint
        self.parameters = [p for _, p in task.trained_parameters(model) if p.requires_grad]
        groups = parameter_groups(
            task.trained_parameters(model),
            schedule.learning_rate,
            schedule.head_learning_rate,
            schedule.weight_decay,
            is_head,
        )
        self.optimizer = torch.optim.AdamW(groups, lr=schedule.learning_rate)
        warmup = check_schedule(schedule.name, schedule.warmup_steps, schedule.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, warmup, schedule.total_steps
        )
        self.first_step = 0
        self.history: list[dict[str, float]] = []
        self.samples, self.seconds = 0, 0.0  # trained in this process, for samples/s
        self.stopped_at: int | None = None  # the step early stopping ended the run at
        self.on_step = on_step or log_step

    # ---------------------------------------------------------------- checkpoints

    def resume(self, checkpoint: Path) -> None:
        states = checkpoints.load_states(checkpoint)
        self.optimizer.load_state_dict(states.pop("optimizer"))
        self.scheduler.load_state_dict(states.pop("scheduler"))
        self.task.load_states(states)
        state = checkpoints.read_state(checkpoint)
        self.first_step, self.history = int(state["step"]), list(state["history"])
        log.info("resuming %s at step %d from %s", self.schedule.name, self.first_step, checkpoint)

    def save(self, step: int) -> None:
        if self.checkpoint_root is None or not distributed.is_main():
            return
        states = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.task.states(),
        }
        checkpoints.save(
            self.checkpoint_root,
            step,
            self.model,
            self.tokenizer,
            states,
            self.fingerprint,
            self.history,
        )

    # ---------------------------------------------------------------- validation

    @property
    def best_dir(self) -> Path:
        assert self.checkpoint_root is not None, "validation needs a checkpoint folder"
        return self.checkpoint_root / BEST_DIR

    def evaluations(self) -> list[tuple[int, float]]:
        """(step, validation figure) of every evaluation so far, from the history."""
        key = f"val_{self.schedule.select_metric}"
        return [(int(h["step"]), h[key]) for h in self.history if key in h]

    def best(self) -> tuple[int, float] | None:
        """(step, figure) of the best evaluation so far (the earliest of equals)."""
        done = self.evaluations()
        return max(done, key=lambda e: (e[1], -e[0])) if done else None

    def patience_spent(self) -> bool:
        """`patience` evaluations in a row without beating the best before them."""
        done, patience = self.evaluations(), self.schedule.patience
        if not patience or len(done) <= patience:
            return False
        best_before = max(figure for _, figure in done[:-patience])
        return all(figure <= best_before for _, figure in done[-patience:])

    def restore_best(self) -> int | None:
        """Load the best evaluation's weights into the model; its step (None: no evaluation)."""
        best = self.best()
        if best is None:
            return None
        distributed.barrier()  # rank 0 wrote them
        checkpoints.load_weights(self.model, self.best_dir)
        return best[0]

    def _validate(self, step: int) -> dict[str, float]:
        """Rank 0 scores the model; every rank gets its figures (the same stop decision)."""
        record: dict[str, float] = {}
        if distributed.is_main():
            record = self.task.validate(step)
            best = self.best()
            key = f"val_{self.schedule.select_metric}"
            if best is None or record[key] > best[1]:
                self.model.save_pretrained(self.best_dir)
        self.model.train()
        return distributed.broadcast(record)

    # ---------------------------------------------------------------- the loop

    def run(self, progress: bool = True) -> None:
        schedule = self.schedule
        main = distributed.is_main()
        self.model.train()
        bar = tqdm(
            total=schedule.total_steps,
            initial=self.first_step,
            desc=schedule.name,
            unit="step",
            disable=not (progress and main),
        )
        start = time.perf_counter()
        due = False  # a checkpoint is due, waiting for the task to allow it
        for step in range(self.first_step, schedule.total_steps):
            record = self.step(step)
            self.history.append({"step": step + 1, **record})
            if main:
                self.on_step(step + 1, record)
            self.seconds = time.perf_counter() - start
            rate = self.samples / self.seconds
            bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{rate:.1f}")
            bar.update()
            last = step + 1 == schedule.total_steps
            if main and ((step + 1) % schedule.log_every == 0 or last):
                log.info(
                    "%s step %d/%d: loss %.4f, %.1f samples/s",
                    schedule.name,
                    step + 1,
                    schedule.total_steps,
                    record["loss"],
                    rate,
                )
            if schedule.eval_every and ((step + 1) % schedule.eval_every == 0 or last):
                scored = self._validate(step + 1)
                self.history[-1].update(scored)
                if main:
                    self.on_step(step + 1, scored)
                    key = f"val_{schedule.select_metric}"
                    log.info("%s step %d: %s %.4f", schedule.name, step + 1, key, scored[key])
                if self.patience_spent():
                    self.stopped_at = step + 1
                    break
            every = schedule.checkpoint_every
            due = due or bool(every and (step + 1) % every == 0)
            if due and self.task.can_checkpoint() and not last:
                self.save(step + 1)
                due = False
        bar.close()

    def step(self, step: int) -> dict[str, float]:
        """One update: seeded forward, backward, gradients averaged across ranks, clipping,
        AdamW and the schedule, then the task's own work. Returns the step's figures."""
        schedule = self.schedule
        torch.manual_seed(step_seed(schedule.seed, schedule.dropout_stream, step))
        with self.autocast():
            loss, record, samples = self.task.loss(step)
        loss.backward()
        distributed.average_gradients(self.parameters)
        nn.utils.clip_grad_norm_(self.parameters, schedule.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record["loss"] = loss.item()
        record["lr"] = self.scheduler.get_last_lr()[0]
        record.update(self.task.after_update(step))
        self.samples += samples
        return record

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast for `bf16` (any device: the CPU path is how the tests exercise it) and
        for `auto` on CUDA; fp32 otherwise. Weights, optimiser states and gradients stay fp32."""
        wanted = self.schedule.precision
        if wanted == "bf16" or (wanted == "auto" and self.device.type == "cuda"):
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield


def parameter_groups(
    named: list[tuple[str, nn.Parameter]],
    learning_rate: float,
    head_learning_rate: float | None,
    weight_decay: float,
    is_head: Callable[[str], bool],
) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases and LayerNorms, as BERT), and
    `head_learning_rate` for the parameters `is_head` names (the layers a pretrained checkpoint
    did not provide, which must move faster than its weights); None = `learning_rate`."""
    head_lr = learning_rate if head_learning_rate is None else head_learning_rate
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in named:
        if not parameter.requires_grad:
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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors to the training device: pinned and copied asynchronously to a GPU."""
    if device.type != "cuda":
        return {key: value.to(device) for key, value in batch.items()}
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}
