"""Training checkpoints that a killed run resumes from, shared by pre-training and fine-tuning.

A checkpoint is a folder `step-NNNNNNN/` holding the model and tokenizer (save_pretrained:
safetensors), the optimiser and scheduler states (`trainer_state.pt`, read back with
`weights_only=True`: plain tensors and numbers, never arbitrary objects) and `trainer_state.json`
(step, a fingerprint of the inputs and settings, the loss history). It is written aside and
renamed in, so a kill leaves the previous one whole.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.atomic import publish_dir
from components.training import distributed

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"  # what save_pretrained writes for models this size
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
_NAME = re.compile(r"step-(\d+)")
KEEP_FINISHED = 8  # finished runs kept per stage for reuse (seeds x variants of a comparison)


def save(
    root: Path,
    step: int,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    states: dict[str, Any],
    fingerprint: str,
    history: list[dict[str, float]],
) -> Path:
    """Write step-N/ aside, swap it in, then drop older checkpoints. `states`: state dicts."""

    def write(work: Path) -> None:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        torch.save(states, work / STATE_PT)
        state = {"step": step, "fingerprint": fingerprint, "history": history}
        (work / STATE_JSON).write_text(json.dumps(state) + "\n", encoding="utf-8")

    final = root / f"step-{step:07d}"
    publish_dir(final, write)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint under `root` made from the same inputs, if any."""
    found = []
    for path in root.glob("step-*"):
        match = _NAME.fullmatch(path.name)
        if match and (path / STATE_JSON).exists():
            found.append((int(match.group(1)), path))
    if not found:
        return None
    path = max(found)[1]
    if read_state(path)["fingerprint"] != fingerprint:
        log.warning("%s was made with other settings or data: starting over", path)
        return None
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8"))


def load_states(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_PT, weights_only=True)  # no arbitrary unpickling


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Copy the checkpoint's weights into `model`'s own tensors.

    Not from_pretrained's memory-mapped tensors: those are only 16-byte aligned, which changes
    float summation order in the last bit, and a resumed run would drift from an uninterrupted one.
    """
    model.load_state_dict(load_file(checkpoint / WEIGHTS))


def replace_tree(source: Path, target: Path) -> None:
    """Copy `source` over `target`, swapped in whole (components/atomic.py)."""
    publish_dir(target, lambda work: shutil.copytree(source, work, dirs_exist_ok=True))


def keep_finished(out_dir: Path, finished: Path, keep: int = KEEP_FINISHED) -> None:
    """Keep a finished run's outputs under its fingerprint, so the same inputs and settings
    again reuse it; only the `keep` most recent are kept (each is a whole model)."""
    replace_tree(out_dir, finished)
    runs = sorted(finished.parent.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in runs[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def reuse_finished(
    finished: Path, out_dir: Path, summary: str, stage: str, started: float
) -> dict[str, float] | None:
    """The metrics of a run of the same inputs and settings that already finished (its folder
    `finished` copied to `out_dir`), or None when there is none. Ranks other than 0 get {}:
    only rank 0 writes."""
    if not (finished / summary).exists():
        return None
    if not distributed.is_main():
        return {}
    log.info("%s of these inputs and settings already finished: reusing %s", stage, finished)
    replace_tree(finished, out_dir)
    metrics = json.loads((out_dir / summary).read_text(encoding="utf-8"))["metrics"]
    return {**metrics, "reused": 1.0, "seconds": time.perf_counter() - started}
