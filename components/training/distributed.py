"""Data parallelism under `torchrun`, with torch.distributed (gloo on CPU, NCCL on GPUs).

`torchrun --nproc-per-node N -m components.cli stage run finetune` starts N processes; each
reads the same data, builds the same global batch (the same seeds) and trains on its own slice
of it. What makes N processes with per-rank batch B equal one process with batch N x B:

- in-batch negatives stay global: each rank's embeddings are gathered from every rank *with
  their gradients* (`gather`, as sentence-transformers' and CLIP's trainers do), so every rank
  computes the loss of the whole global batch;
- the gradients are averaged across ranks after each backward (`average_gradients`); with the
  global loss on every rank, that average is exactly the single process's gradient;
- rank 0 alone logs, validates and writes; the others receive its figures (`broadcast`).

Outside torchrun (no WORLD_SIZE, or 1) every function here is a no-op and the rank is 0.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes (idempotent; nothing without torchrun)."""
    if world_size() > 1 and not active():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shard_sizes(total: int) -> list[int]:
    """Rows per rank of a global batch of `total` rows: as equal as possible, in rank order."""
    n = dist.get_world_size() if active() else 1
    return [total // n + (r < total % n) for r in range(n)]


def shard(rows: Any, total: int) -> Any:
    """This rank's contiguous slice of a global batch of `total` rows."""
    if not active():
        return rows
    sizes = shard_sizes(total)
    start = sum(sizes[: rank()])
    return rows[start : start + sizes[rank()]]


class _GatherWithGradient(torch.autograd.Function):
    """all_gather forward (rows padded to the largest shard and cut back); backward sums every
    rank's gradient of the whole batch and keeps the local rows' part (all_reduce: gloo has no
    reduce-scatter or all-to-all)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor, sizes: list[int]
    ) -> torch.Tensor:
        widest = max(sizes)
        padded = tensor.new_zeros((widest, *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.rows = sum(sizes[: dist.get_rank()]), len(tensor)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.rows], None


def gather(tensor: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's rows of a global batch of `total` rows, in rank order, keeping the autograd
    graph to the local rows."""
    if not active():
        return tensor
    return _GatherWithGradient.apply(tensor, shard_sizes(total))


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Average the gradients over the ranks, in one flat all_reduce. A parameter no rank's loss
    reached keeps no gradient (so AdamW leaves it alone, as in one process); one that only some
    ranks reached (an empty slice of a small batch) counts zero on the others."""
    if not active():
        return
    device = parameters[0].device  # NCCL reduces CUDA tensors only
    reached = torch.tensor([p.grad is not None for p in parameters], device=device)
    reached = reached.float()
    dist.all_reduce(reached)
    used = [p for p, r in zip(parameters, reached.tolist(), strict=True) if r > 0]
    if not used:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in used]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for parameter, grad in zip(used, grads, strict=True):
        parameter.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
