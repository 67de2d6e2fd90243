"""Pre-training throughput: CE-BERT's whole training step against a bare BertModel of its size.

    python benchmarks/bench_pretrain.py                     # default config, demo store
    python benchmarks/bench_pretrain.py --wall-limit 1200   # also time the real `pretrain`

At the default config (params.yaml `pretrain`, variant cebert: the batch's longest title + 16 patch
+ 1 [SEP] + 49 pixel tokens) on the demo store (artifacts/), one process times, step by step:
  - ours: a batch collated from the memory-mapped store (pairs, MLM/MPM masking, gathers),
    CeBertForPreTraining forward with the three losses, backward, gradient clipping, AdamW;
  - bare: a transformers BertModel of the same size (hidden, layers, heads, intermediate, vocab)
    on random token ids of the same length (our batches' median padded length) and batch,
    forward, sum of the last hidden state as the loss, backward, clipping, AdamW.
The two alternate in blocks (which goes first alternates too), so load from other processes
hits both alike; the ratio of median step times is the overhead of the data pipeline, the
image projections and the three heads (the issue aims for <= 1.25x). Peak memory is measured
for each in its own subprocess (peak RSS over the few steps, and its growth over the set-up).
With --wall-limit, the real `pretrain` runs at the default config into a temporary folder in a
subprocess; past the limit it is stopped and its wall time projected from the steps done.
Prints a table and writes benchmarks/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from components.config import Params, load_params
from components.data.clicklog import split_days
from components.features.features import FeatureStore
from components.models import pretrained
from components.models.tokenizer import train_wordpiece
from components.training import pretrain as pt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1.25
VARIANT = "cebert"

Step = Callable[[], None]


def _params() -> Params:
    return load_params(ROOT / "params.yaml", {"model.variant": VARIANT})


def ours_step(params: Params) -> tuple[Step, dict]:
    """One real training step of `pretrain`, batches cycling through an epoch of pairs."""
    cfg = params.pretrain
    artifacts = ROOT / params.paths.artifacts_dir
    products = pd.read_parquet(artifacts / "validate" / "products.parquet")
    impressions = pd.read_parquet(artifacts / "validate" / "impressions.parquet")
    store = FeatureStore(artifacts / "features")
    products = products[products.product_id.isin(store.row_of)]
    if cfg.init_from:  # the pretrained backbone's own vocabulary
        tokenizer = BertTokenizerFast.from_pretrained(pretrained.resolve(cfg.init_from))
    else:
        texts = pt.training_texts(products, split_days(impressions, params.split).train)
        tokenizer = train_wordpiece(texts, cfg.vocab_size)
    train_ids, _ = pt.split_products(list(products.product_id), cfg.eval_share, cfg.seed)
    titles = products.set_index("product_id")["title"].astype(str)
    data = pt._dataset(train_ids, titles, store, params.model, tokenizer, cfg)
    torch.manual_seed(cfg.seed)
    model = pt.build_model(cfg, params.model, store.manifest, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    pairs = data.pairs(np.random.default_rng(0))
    weights = (cfg.loss_weights.mlm, cfg.loss_weights.mpm, cfg.loss_weights.tip)
    state = {"index": 0}
    n_batches = len(pairs) // cfg.batch_size

    def step() -> None:
        i = state["index"] % n_batches
        state["index"] += 1
        chunk = pairs.slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
        batch = data.collate(chunk, np.random.default_rng(i))
        out = model(**batch, loss_weights=weights)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def collate_only() -> None:
        i = state["index"] % n_batches
        state["index"] += 1
        data.collate(
            pairs.slice(i * cfg.batch_size, (i + 1) * cfg.batch_size), np.random.default_rng(i)
        )

    cfg_out = model.config
    rng = np.random.default_rng(0)
    widths = [  # batches are padded to their longest title
        data.collate(pairs.slice(i * cfg.batch_size, (i + 1) * cfg.batch_size), rng)[
            "input_ids"
        ].shape[1]
        for i in range(min(n_batches, 50))
    ]
    info = {
        "sizes": {
            "hidden_size": cfg_out.hidden_size,
            "num_hidden_layers": cfg_out.num_hidden_layers,
            "num_attention_heads": cfg_out.num_attention_heads,
            "intermediate_size": cfg_out.intermediate_size,
        },
        "vocab_size": cfg_out.vocab_size,
        "seq_len": int(np.median(widths)) + cfg_out.n_image_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "collate": collate_only,
    }
    return step, info


def bare_step(params: Params, vocab_size: int, seq_len: int, sizes: dict) -> tuple[Step, dict]:
    """A stock BertModel of our encoder's sizes (the pretrained backbone's, with init_from)."""
    cfg = params.pretrain
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=vocab_size,
            **sizes,
            max_position_embeddings=seq_len,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
        )
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        ids = torch.randint(5, vocab_size, (cfg.batch_size, seq_len), generator=g)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        out.last_hidden_state.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, {"parameters": sum(p.numel() for p in model.parameters())}


def interleaved(steps: dict[str, Step], rounds: int, per_round: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(per_round):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    return times


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(kind: str, steps: int, vocab_size: int, seq_len: int, sizes: dict) -> None:
    """Run in a subprocess: set up `kind`, run a few steps, print its memory as JSON.

    The peak is the kernel's high-water mark of resident memory, reset after the set-up
    (writing 5 to /proc/self/clear_refs), so it is the training steps' own peak.
    """
    params = _params()
    if kind == "ours":
        step, _ = ours_step(params)
    else:
        step, _ = bare_step(params, vocab_size, seq_len, sizes)
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    for _ in range(steps):
        step()
    peak = _status_mb("VmHWM")
    print(json.dumps({"rss_after_setup_mb": base, "peak_rss_mb": peak, "growth_mb": peak - base}))


def _memory(kind: str, steps: int, vocab_size: int, seq_len: int, sizes: dict) -> dict:
    command = [sys.executable, __file__, "--memory-worker", kind, "--memory-steps", str(steps)]
    command += ["--vocab-size", str(vocab_size), "--seq-len", str(seq_len)]
    command += ["--sizes", json.dumps(sizes)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


WALL_RUNNER = """
import json, sys, time
from pathlib import Path
from components.training import pretrain as pt
from components.config import load_params
progress = Path(sys.argv[2])
start = time.perf_counter()
log_step = pt.log_step
def record(step, values):
    log_step(step, values)
    progress.write_text(json.dumps({"step": step, "seconds": time.perf_counter() - start}))
pt.log_step = record
params = load_params("params.yaml", {"model.variant": "%s"})
metrics = pt.pretrain(params, Path(sys.argv[1]), progress=False)
progress.write_text(json.dumps({"done": True, "metrics": metrics}))
"""


def wall(limit: float) -> dict:
    """The real `pretrain` at the default config; stopped at `limit` seconds and projected."""
    params = _params()
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        progress = Path(tmp) / "progress.json"
        child = subprocess.Popen(
            [sys.executable, "-c", WALL_RUNNER % VARIANT, str(Path(tmp) / "out"), str(progress)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        start = time.perf_counter()
        while child.poll() is None and time.perf_counter() - start < limit:
            time.sleep(5)
        finished = child.poll() == 0
        if child.poll() is None:
            child.kill()
            child.wait()
        elapsed = time.perf_counter() - start
        state = json.loads(progress.read_text()) if progress.exists() else {}
    if finished and state.get("done"):
        return {"finished": True, "seconds": elapsed, "metrics": state["metrics"]}
    # Steps per epoch as `pretrain` counts them, for the projection.
    store = FeatureStore(ROOT / params.paths.artifacts_dir / "features")
    products = pd.read_parquet(ROOT / params.paths.artifacts_dir / "validate" / "products.parquet")
    n = int(products.product_id.isin(store.row_of).sum())
    cfg = params.pretrain
    n_train = n - max(2, round(cfg.eval_share * n))
    total = cfg.max_steps or cfg.epochs * -(-n_train * (1 + cfg.tip_negatives) // cfg.batch_size)
    step, seconds = state.get("step", 0), state.get("seconds", 0.0)
    return {
        "finished": False,
        "seconds_run": elapsed,
        "steps_done": step,
        "total_steps": total,
        "projected_seconds": seconds / step * total + (elapsed - seconds) if step else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per block")
    parser.add_argument("--rounds", type=int, default=6, help="blocks per model (after warm-up)")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--wall-limit", type=float, default=0, help="seconds; 0 skips the run")
    parser.add_argument("--memory-worker", choices=("ours", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.memory_worker:
        memory_worker(
            args.memory_worker, args.memory_steps, args.vocab_size, args.seq_len, args.sizes
        )
        return

    params = _params()
    cfg = params.pretrain
    ours, info = ours_step(params)
    bare, bare_info = bare_step(params, info["vocab_size"], info["seq_len"], info["sizes"])
    interleaved({"ours": ours, "bare": bare}, rounds=2, per_round=2)  # warm-up
    times = interleaved({"ours": ours, "bare": bare}, args.rounds, args.steps)
    collate = [0.0] * 20
    for i in range(len(collate)):
        start = time.perf_counter()
        info["collate"]()
        collate[i] = time.perf_counter() - start

    median = {name: float(np.median(t)) for name, t in times.items()}
    memory = {
        name: _memory(name, args.memory_steps, info["vocab_size"], info["seq_len"], info["sizes"])
        for name in ("ours", "bare")
    }
    ratio = median["ours"] / median["bare"]
    rows = []
    for name, label in (("ours", "CE-BERT pre-training step"), ("bare", "bare BertModel fwd/bwd")):
        rows.append(
            {
                "what": label,
                "median_step_s": median[name],
                "samples_per_second": cfg.batch_size / median[name],
                "peak_rss_mb": memory[name]["peak_rss_mb"],
                "rss_growth_mb": memory[name]["growth_mb"],
            }
        )
    result = {
        "config": {
            "variant": VARIANT,
            "batch_size": cfg.batch_size,
            "seq_len": info["seq_len"],
            "text_len": cfg.max_text_len,
            "init_from": cfg.init_from,
            **info["sizes"],
            "vocab_size": info["vocab_size"],
            "parameters_ours": info["parameters"],
            "parameters_bare": bare_info["parameters"],
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_1m": os.getloadavg()[0],
        },
        "steps_timed": {name: len(t) for name, t in times.items()},
        "rows": rows,
        "collate_median_s": float(np.median(collate)),
        "ratio": ratio,
        "target": TARGET,
        "meets_target": ratio <= TARGET,
    }
    if args.wall_limit:
        result["wall"] = wall(args.wall_limit)

    print(f"{'':28s} {'step s':>8s} {'samples/s':>10s} {'peak RSS MB':>12s} {'growth MB':>10s}")
    for row in rows:
        print(
            f"{row['what']:28s} {row['median_step_s']:8.3f} {row['samples_per_second']:10.1f} "
            f"{row['peak_rss_mb']:12.0f} {row['rss_growth_mb']:10.0f}"
        )
    print(
        f"ratio ours/bare: {ratio:.2f}x (target <= {TARGET}x); "
        f"collate {1000 * result['collate_median_s']:.1f} ms of each step"
    )
    if "wall" in result:
        print(json.dumps(result["wall"], indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pretrain.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
