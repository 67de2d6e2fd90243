"""GPU check: CE-BERT pre-training and ACE-BERT fine-tuning steps on CUDA, bounded in time.

    python benchmarks/bench_gpu.py          # CUDA, bf16, the paper's sizes (4 layers, batch 384)
    python benchmarks/bench_gpu.py --device cpu --seconds 20 --batch 16   # a dry run anywhere

For each of the two training steps (the real modules and losses: CeBertForPreTraining with MLM +
MPM + TIP; AceBertForRetrieval's two towers with Eq. 5 and the adversary's confusion term) on
inputs of the real shapes (title 48 tokens, product text 64, query 16, 16 patch + 49 pixel
tokens; random values: throughput does not depend on them), it runs warm-up steps, then as many
timed steps as fit in `--seconds`, and reports samples/s, the peak GPU memory and the model-FLOPs
utilisation: 6 x parameters x tokens per step (forward + backward of every weight; attention's
own FLOPs left out, as is usual) over the step time, against the GPU's dense bf16 peak
(`--peak-tflops`, 989 for an H100/H200 SXM). Prints a table and writes
benchmarks/results/gpu.json. Bounded: `--seconds` per step kind, about 4 minutes in all by
default, well inside 8 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from components.models import pretrained
from components.models.modeling import (
    AceBertForRetrieval,
    CeBertConfig,
    CeBertForPreTraining,
    confusion_loss,
    init_text_encoder_from,
    semantic_matching_loss,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TITLE, PRODUCT_TEXT, QUERY, PATCHES, PIXELS = 48, 64, 16, 16, 49


def config(layers: int) -> CeBertConfig:
    from transformers import BertConfig

    base = BertConfig.from_pretrained(pretrained.resolve("all-MiniLM-L6-v2"))
    cfg = CeBertConfig(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=base.num_attention_heads,
        intermediate_size=base.intermediate_size,
        patch_dim=1280,
        n_patches=PATCHES,
        pixel_dim=3072,
        n_pixel_tokens=PIXELS,
        max_text_len=TITLE,
        text_positions=128,
        tip_pooling="match",
        embedding_dim=128,
    )
    cfg.max_position_embeddings = 512
    return cfg


def images(batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "patch_features": torch.randn(batch, PATCHES, 1280, device=device),
        "pixel_values": torch.randint(
            0, 255, (batch, PIXELS, 3072), device=device, dtype=torch.uint8
        ),
    }


def text(batch: int, length: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (batch, length), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pretrain_step(cfg: CeBertConfig, batch: int, device: torch.device, bf16: bool):
    model = CeBertForPreTraining(cfg)
    init_text_encoder_from(model, pretrained.resolve("all-MiniLM-L6-v2"))
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    inputs = {**text(batch, TITLE, cfg.vocab_size, device), **images(batch, device)}
    labels = inputs["input_ids"].clone()
    labels[torch.rand(labels.shape, device=device) > 0.15] = -100
    inputs["mlm_labels"] = labels
    inputs["patch_mask"] = torch.rand(batch, PATCHES, device=device) < 0.15
    inputs["tip_labels"] = (torch.arange(batch, device=device) % 4 == 0).long()
    tokens = batch * (TITLE + PATCHES + 1 + PIXELS)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters()), tokens


def finetune_step(cfg: CeBertConfig, batch: int, device: torch.device, bf16: bool):
    model = AceBertForRetrieval(cfg)
    init_text_encoder_from(model, pretrained.resolve("all-MiniLM-L6-v2"))
    model.to(device).train()
    towers = [p for n, p in model.named_parameters() if not n.startswith("domain_classifier.")]
    optimizer = torch.optim.AdamW(towers, lr=5e-5)
    queries = text(batch, QUERY, cfg.vocab_size, device)
    products = {**text(batch, PRODUCT_TEXT, cfg.vocab_size, device), **images(batch, device)}
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    tokens = batch * (QUERY + PRODUCT_TEXT + PATCHES + 1 + PIXELS)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            q = model.encode_queries(**queries)
            p = model.encode_products(**products)
            loss = semantic_matching_loss(q.float(), p.float(), 20.0, eye)
            model.domain_classifier.requires_grad_(False)
            loss = loss + 0.1 * confusion_loss(
                model.domain_classifier(torch.cat([q, p])).squeeze(-1)
            )
            model.domain_classifier.requires_grad_(True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(towers, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in towers), tokens


def timed(step, device: torch.device, seconds: float, warmup: int) -> dict[str, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    times.sort()
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )
    return {"steps": len(times), "median_step_s": times[len(times) // 2], "peak_memory_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4, help="the paper keeps 4 of BERT's layers")
    parser.add_argument("--batch", type=int, default=384, help="the paper's batch")
    parser.add_argument("--seconds", type=float, default=90.0, help="timed seconds per step kind")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense peak")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: run with --device cpu for a dry run")
    bf16 = args.precision == "bf16" and device.type == "cuda"
    cfg = config(args.layers)
    rows = []
    for name, build in (("pretrain", pretrain_step), ("finetune", finetune_step)):
        step, parameters, tokens = build(cfg, args.batch, device, bf16)
        result = timed(step, device, args.seconds, args.warmup)
        flops = 6 * parameters * tokens / result["median_step_s"]
        rows.append(
            {
                "step": name,
                **result,
                "samples_per_second": args.batch / result["median_step_s"],
                "tokens_per_step": tokens,
                "parameters": parameters,
                "model_tflops": flops / 1e12,
                "mfu": flops / (args.peak_tflops * 1e12),
            }
        )
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    machine = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "torch": torch.__version__,
        "precision": "bf16" if bf16 else "fp32",
        "layers": args.layers,
        "batch": args.batch,
        "peak_tflops": args.peak_tflops,
    }
    print(f"{machine['device']} ({machine['precision']}, {args.layers} layers, batch {args.batch})")
    print(
        f"{'step':10s} {'step s':>8s} {'samples/s':>10s} {'peak GiB':>9s} "
        f"{'TFLOP/s':>8s} {'MFU':>6s}"
    )
    for row in rows:
        print(
            f"{row['step']:10s} {row['median_step_s']:8.3f} {row['samples_per_second']:10.1f} "
            f"{row['peak_memory_gib']:9.1f} {row['model_tflops']:8.1f} {row['mfu']:6.1%}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine, "rows": rows}
    (RESULTS / "gpu.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
