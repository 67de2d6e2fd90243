"""Benchmark the synthetic world generator at one scale.

    python benchmarks/bench_world.py --scale bench            # into a temporary folder
    python benchmarks/bench_world.py --scale demo --out data  # keep the world

Prints a table and writes benchmarks/results/world_<scale>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path

from components.config import load_params
from components.data.world import WorldSummary, generate_world

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _bytes(root: Path) -> tuple[int, int]:
    """(all files, images only) in bytes."""
    sizes = {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}
    return sum(sizes.values()), sum(s for p, s in sizes.items() if p.parent.name == "images")


def _table(scale: str, workers: int, s: WorldSummary, total: int, images: int) -> str:
    rows = [
        ("products drawn", f"{s.n_products:,}", f"{s.image_seconds:8.1f} s",
         f"{s.products_per_second:10,.0f} products/s"),
        ("click log", f"{s.n_impressions:,} impressions", f"{s.click_seconds:8.1f} s",
         f"{s.impressions_per_second:10,.0f} impressions/s"),
        ("total", f"{s.n_searches:,} searches, {s.n_clicks:,} clicks", f"{s.seconds:8.1f} s", ""),
        ("files", f"{total / 1e6:,.1f} MB", "", f"images {images / 1e6:,.1f} MB"),
    ]  # fmt: skip
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"world at scale {scale!r}, {workers} worker(s), {os.cpu_count()} CPU(s)"]
    lines += ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="bench")
    parser.add_argument("--out", type=Path, help="keep the world here (default: a temp folder)")
    parser.add_argument("--workers", type=int, help="drawing processes (default: params.yaml)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = parser.parse_args()

    overrides: dict[str, object] = {"synth.scale": args.scale}
    if args.workers:
        overrides["synth.workers"] = args.workers
    cfg = load_params(args.params, overrides).synth

    with tempfile.TemporaryDirectory(prefix="ace-world-") as tmp:
        out = args.out or Path(tmp)
        summary = generate_world(cfg, out)
        total, images = _bytes(out)

    print(_table(args.scale, cfg.workers, summary, total, images))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "scale": args.scale,
        "workers": cfg.workers,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **asdict(summary),
        "files_bytes": total,
        "images_bytes": images,
    }
    path = RESULTS / f"world_{args.scale}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
