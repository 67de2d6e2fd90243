"""Linear probe of patch-encoder features: pretrained EfficientNet-Lite0 vs the same net random.

A logistic-regression probe (5-fold cross-validated accuracy) on the pooled features shows how much
ImageNet pretraining buys over random weights of the same architecture, on
  - synthetic crops: 4 colours x 4 shapes on noisy light canvases (like the world's) and on
    noisy coloured canvases (harder for colour), labels colour, shape and both (16 classes);
  - with --data DIR, a generated world's product images cropped to their true object box,
    labels colour, pattern and category (hidden ground truth, used here only to evaluate).
It also times `encode` (crops/s) at each input size. Prints a table, writes JSON.

    python benchmarks/bench_backbone_probe.py [--data data] [--per-class 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from components.features.backbones import (
    PRETRAINED_LITE0,
    RANDOM_LITE0,
    PatchEncoder,
    load_patch_encoder,
)
from components.features.probe import BACKGROUNDS, FOLDS, make_shapes, probe_accuracy

ROOT = Path(__file__).resolve().parents[1]


def world_crops(
    data_dir: Path, max_products: int, seed: int
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Product images of a generated world cropped to their true object box, with true labels."""
    import pandas as pd

    from components.data.contract import IMAGES_DIR, PRODUCTS, TRUTH_DIR

    truth = pd.read_parquet(data_dir / TRUTH_DIR / f"{PRODUCTS}.parquet")
    if len(truth) > max_products:
        truth = truth.sample(max_products, random_state=seed)
    crops = []
    for row in truth.itertuples():
        bgr = cv2.imread(str(data_dir / IMAGES_DIR / f"{row.product_id}.jpg"), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"cannot read the image of product {row.product_id} under {data_dir}")
        crops.append(bgr[row.bbox_y0 : row.bbox_y1, row.bbox_x0 : row.bbox_x1, ::-1])
    labels = {}
    for task in ("color", "pattern", "category"):
        values = truth[task].to_numpy()
        names, counts = np.unique(values, return_counts=True)
        labels[task] = np.array([{n: i for i, n in enumerate(names)}[v] for v in values])
        labels[task][np.isin(values, names[counts < FOLDS])] = -1  # too rare to stratify
    return crops, labels


def probe_rows(
    prefix: str,
    crops: list[np.ndarray],
    labels: dict[str, np.ndarray],
    encoders: dict[str, PatchEncoder],
    seed: int,
) -> list[dict]:
    feats = {name: enc.encode(crops).numpy() for name, enc in encoders.items()}
    rows = []
    for task, y in labels.items():
        keep = y >= 0
        acc = {name: probe_accuracy(f[keep], y[keep], seed) for name, f in feats.items()}
        pre, rnd = acc[PRETRAINED_LITE0], acc[RANDOM_LITE0]
        rows.append(
            {
                "task": f"{prefix} {task}",
                "classes": len(np.unique(y[keep])),
                "n": int(keep.sum()),
                "chance": float(np.bincount(y[keep]).max() / keep.sum()),
                "pretrained": round(pre, 4),
                "random": round(rnd, 4),
                "ratio": round(pre / rnd, 3),
            }
        )
        print(f"{rows[-1]['task']:<34} {pre:>10.3f} {rnd:>8.3f} {pre / rnd:>6.2f}", flush=True)
    return rows


def throughput(encoder: PatchEncoder, n: int, batch_size: int | None, seed: int) -> float:
    """Best of 3 timings of `encode` end to end (resize, normalise, network) on patch-sized crops,
    in crops/s: the machine is shared, so the best run is the least disturbed one."""
    rng = np.random.default_rng(seed)
    crops = [
        rng.integers(0, 256, size=(int(s), int(s) + 7, 3), dtype=np.uint8)
        for s in rng.integers(40, 90, size=n)
    ]
    encoder.encode(crops[:64], batch_size)  # warm-up: allocator, kernels
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        encoder.encode(crops, batch_size)
        seconds.append(time.perf_counter() - start)
    return n / min(seconds)


def _world_identity(data_dir: Path) -> dict:
    from components.data.contract import WORLD_MANIFEST

    manifest = json.loads((data_dir / WORLD_MANIFEST).read_text())
    return {"dir": str(data_dir), "scale": manifest["scale"], "seed": manifest["seed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100, help="synthetic crops per colour x shape")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 112], help="probe input sides")
    ap.add_argument("--data", type=Path, help="a generated world (truth/products.parquet, images/)")
    ap.add_argument("--max-products", type=int, default=3000)
    ap.add_argument("--throughput-sizes", type=int, nargs="+", default=[64, 112, 224])
    ap.add_argument("--throughput-crops", type=int, default=512)
    ap.add_argument("--batch-size", type=int, help="encode batch (default: the encoder's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/backbone_probe.json")
    args = ap.parse_args()

    world = world_crops(args.data, args.max_products, args.seed) if args.data else None
    synthetic = {bg: make_shapes(args.per_class, args.seed, bg) for bg in BACKGROUNDS}
    print(f"{'task':<34} {'pretrained':>10} {'random':>8} {'ratio':>6}")
    rows = []
    for size in args.sizes:
        names = (PRETRAINED_LITE0, RANDOM_LITE0)
        encoders = {n: load_patch_encoder(n, input_size=size) for n in names}
        for bg, (crops, labels) in synthetic.items():
            rows += probe_rows(f"{size}px shapes/{bg}", crops, labels, encoders, args.seed)
        if world:
            rows += probe_rows(f"{size}px world", *world, encoders, args.seed)

    speed = []
    for size in args.throughput_sizes:
        encoder = load_patch_encoder(PRETRAINED_LITE0, input_size=size)
        batch = args.batch_size or encoder.default_batch_size()
        load = os.getloadavg()[0]  # other work on the machine slows every figure down
        rate = throughput(encoder, args.throughput_crops, batch, args.seed)
        speed.append(
            {
                "input_size": size,
                "batch": batch,
                "crops_per_s": round(rate, 1),
                "load_avg_1min": round(load, 2),
            }
        )
        print(f"encode at {size}px, batch {batch}: {rate:.1f} crops/s (load average {load:.1f})")

    result = {
        "probe": "5-fold CV accuracy, StandardScaler + LogisticRegression(C=0.1)",
        "backbones": [PRETRAINED_LITE0, RANDOM_LITE0],
        "synthetic_per_class": args.per_class,
        "world": _world_identity(args.data) if args.data else None,
        "world_products": len(world[0]) if world else 0,
        "rows": rows,
        "throughput": speed,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
