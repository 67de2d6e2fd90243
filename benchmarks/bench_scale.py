"""Every stage's cost at one world scale: wall seconds and peak memory, from the world up.

    python benchmarks/bench_scale.py --project DIR --scale demo
    python benchmarks/bench_scale.py --project DIR --scale bench \\
        -S pretrain.max_steps=2000 -S finetune.max_steps=1500
    python benchmarks/bench_scale.py --compare benchmarks/results/scale_demo.json \\
        benchmarks/results/scale_bench.json

DIR is a project checkout (a fresh clone: its data/ and artifacts/ are overwritten). The world is
generated with `ace data synth --scale S`, then each stage of the registry runs in its own
`ace stage run NAME` process with the given overrides, as `dvc repro` would run it. A thread
samples the resident memory of the stage's process tree every 0.2 s: the peak is the largest sum,
and the peak of its anonymous part (resident minus the file pages it maps: the feature store is
memory-mapped, so a stage that reads it all shows the store's size as resident).
Writes benchmarks/results/scale_<S>.json and prints a table.

`--compare A B` prints, per stage, B's seconds and peak memory over A's beside the data's growth
(products, training pairs and impressions of B over A): a stage whose time grows faster than the
data it reads is the one to fix before a larger run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
GIB = 1024**3


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """Resident and anonymous resident bytes of a process and all its children (worker pools,
    dataloaders). Anonymous memory is what the process holds; the rest of its resident pages
    are files it maps (the feature store), which the kernel can drop and reread."""
    resident = anonymous = 0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child that has just exited
            info = proc.memory_info()
            resident += info.rss
            anonymous += info.rss - info.shared
    return resident, anonymous


def run_measured(command: list[str], cwd: Path, log: Path) -> tuple[float, int, int, int]:
    """Wall seconds, peak tree resident and anonymous bytes and exit status of one command,
    its output into `log`."""
    peak = peak_anonymous = 0
    with log.open("ab") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        process = psutil.Process(child.pid)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_anonymous
            while not done.is_set():
                try:
                    resident, anonymous = tree_memory(process)
                except psutil.Error:
                    return
                peak, peak_anonymous = max(peak, resident), max(peak_anonymous, anonymous)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        status = child.wait()
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return seconds, peak, peak_anonymous, status


def data_sizes(project: Path) -> dict[str, int]:
    """What the stages read: validated products and impressions, training pairs."""
    sizes: dict[str, int] = {}
    for stage, keys in {
        "validate": ("products_kept", "impressions_kept"),
        "finetune": ("n_pairs", "steps_trained"),
        "pretrain": ("n_train_products", "steps"),
        "baselines": ("st_finetune_pairs", "st_finetune_steps"),
        "distill": ("texts",),
    }.items():
        path = project / "metrics" / f"{stage}.json"
        if path.exists():
            metrics = json.loads(path.read_text(encoding="utf-8"))
            sizes |= {f"{stage}.{k}": int(metrics[k]) for k in keys if k in metrics}
    return sizes


def measure(project: Path, scale: str, overrides: list[str], out: Path) -> dict[str, object]:
    """Runs the world and every stage; `out` is rewritten after each, so a run stopped part
    way keeps the stages it finished."""
    ace = str(Path(sys.executable).with_name("ace"))
    sets = [arg for item in overrides for arg in ("-S", item)]
    log = RESULTS / f"scale_{scale}.log"
    log.unlink(missing_ok=True)
    stages = subprocess.run(
        [ace, "stage", "list"], cwd=project, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    stages = [line.split()[0] for line in stages if line.strip()]
    steps = [("world", [ace, "data", "synth", "--scale", scale, *sets])]
    steps += [(name, [ace, "stage", "run", name, *sets]) for name in stages]
    rows: list[dict[str, object]] = []
    result: dict[str, object] = {}
    for name, command in steps:
        seconds, peak, anonymous, status = run_measured(command, project, log)
        rows.append(
            {
                "stage": name,
                "seconds": round(seconds, 1),
                "peak_gib": peak / GIB,
                "peak_anonymous_gib": anonymous / GIB,
            }
        )
        print(
            f"{name:<10} {seconds:>9.1f} s {peak / GIB:>7.2f} GiB"
            f" ({anonymous / GIB:.2f} anonymous)",
            flush=True,
        )
        result = {
            "scale": scale,
            "overrides": overrides,
            "cpus": os.cpu_count(),
            "stages": rows,
            "sizes": data_sizes(project),
            "total_seconds": round(sum(float(r["seconds"]) for r in rows), 1),
        }
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if status != 0:
            sys.exit(f"{name} failed (exit {status}); its output is in {log}")
    return result


def compare(small: dict, large: dict) -> None:
    growth = {
        key: large["sizes"][key] / small["sizes"][key]
        for key in small["sizes"]
        if key in large["sizes"] and small["sizes"][key]
    }
    print(f"{large['scale']} over {small['scale']}, the data grew:")
    for key, factor in growth.items():
        print(f"  {key:<28} x{factor:,.1f}")
    print(f"{'stage':<10} {'seconds':>18} {'x':>7} {'peak GiB':>14} {'x':>6} {'anon GiB':>14}")
    before = {row["stage"]: row for row in small["stages"]}
    for row in large["stages"]:
        ref = before.get(row["stage"])
        if ref is None:
            continue
        time_x = row["seconds"] / max(ref["seconds"], 1e-9)
        mem_x = row["peak_gib"] / max(ref["peak_gib"], 1e-9)
        anon = (
            f" {ref['peak_anonymous_gib']:>6.2f} {row['peak_anonymous_gib']:>7.2f}"
            if "peak_anonymous_gib" in ref and "peak_anonymous_gib" in row
            else ""
        )
        print(
            f"{row['stage']:<10} {ref['seconds']:>8.0f} {row['seconds']:>9.0f} {time_x:>7.1f}"
            f" {ref['peak_gib']:>6.2f} {row['peak_gib']:>7.2f} {mem_x:>6.1f}{anon}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--scale", default="demo")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("SMALL", "LARGE"))
    args = parser.parse_args()
    if args.compare:
        small, large = (json.loads(p.read_text(encoding="utf-8")) for p in args.compare)
        compare(small, large)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"scale_{args.scale}.json"
    result = measure(args.project.resolve(), args.scale, args.overrides, out)
    print(f"total {result['total_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
