"""Benchmark the features stage against the bare cost of its images: decode, RoI, CNN, pixels.

    python benchmarks/bench_features.py                      # every validated demo product
    python benchmarks/bench_features.py --limit 500          # the first 500
    python benchmarks/bench_features.py --cnn-limit 1000     # fewer for the CNN-only steps

All steps run in one process on the same products, in this order:
  1. bare decode: read + cv2.imdecode (the stage's `read_workers` threads);
  2. RoI: decode + `detect_roi`, against (1);
  3. bare CNN: decode + the same 16 crops per image on a fixed grid (no RoI) + the encoder's
     `preprocess` and forward pass, in the stage's batches;
  4. one patch variant as the stage does it: `_read` + `_decode` + RoI + `_encode_rows` (crops,
     `encode`, float16 and its error), against (3). Steps 3 and 4 are interleaved chunk by chunk
     (alternating which goes first), so load from other processes hits both alike;
  5. the whole `build_features` call (both variants) into a temporary folder, with its peak memory
     sampled in a thread. Its reference (3b) is measured inside it: after each chunk the stage
     encodes, the bare CNN of (3) runs on the same images off the stage's clock, so both see the
     same load; the ratio is stage / (decode + 2 x forward part). Then (5b) a rebuild into the
     same folder, where every row is reused;
  6. pixel tokens computed on the fly per sample (read, decode, resize, tile: what a data loader
     would do) against reading rows from the stage's uint8 memmap in shuffled order, each with the
     files in the page cache (warm) and evicted from it (cold), plus the bytes each costs.

Every rate is wall-clock; CPU seconds (all threads) are in the JSON too. Prints a table and
writes benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import psutil
import torch

from components.config import FeaturesConfig, load_params
from components.features import features as F
from components.features.backbones import PatchEncoder, load_patch_encoder
from components.features.roi import detect_roi, grid_boxes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 1.3  # the ceiling on the stage's time over its bare cost
SEED = 0


# ------------------------------------------------------------------------------ timing helpers


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _system_busy() -> float:
    """CPU seconds every process on the machine has used (all CPUs, steal included), or NaN."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


@dataclass
class Clock:
    """Accumulated wall and process-CPU seconds of the blocks timed with it, and the CPU seconds
    other processes (and the hypervisor's steal) used meanwhile: how contended the timing was."""

    wall: float = 0.0
    cpu: float = 0.0
    foreign: float = 0.0

    @contextmanager
    def run(self) -> Iterator[None]:
        busy, wall, cpu = _system_busy(), time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            own = time.process_time() - cpu
            self.wall += time.perf_counter() - wall
            self.cpu += own
            self.foreign += max(0.0, _system_busy() - busy - own)

    def __add__(self, other: Clock) -> Clock:
        return Clock(self.wall + other.wall, self.cpu + other.cpu, self.foreign + other.foreign)

    def __sub__(self, other: Clock) -> Clock:
        return Clock(self.wall - other.wall, self.cpu - other.cpu, self.foreign - other.foreign)

    def scaled(self, factor: float) -> Clock:
        return Clock(self.wall * factor, self.cpu * factor, self.foreign * factor)

    def per(self, n: int) -> Clock:
        return Clock(self.wall / n, self.cpu / n, self.foreign / n)

    def figures(self, n: int, unit: str = "images") -> dict[str, float]:
        cpus = os.cpu_count() or 1
        return {
            "n": n,
            "seconds": self.wall,
            "cpu_seconds": self.cpu,
            f"{unit}_per_second": n / self.wall if self.wall else 0.0,
            "ms_per_item": 1e3 * self.wall / n if n else 0.0,
            "foreign_cpu_share": self.foreign / (self.wall * cpus) if self.wall else 0.0,
        }


class MemorySampler:
    """Peak resident memory of this process while active, sampled every `every` seconds.

    RSS counts the pages of the stage's memory-mapped output files too; on Linux the split into
    anonymous (heap) and file-backed pages comes from /proc/self/status."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.process = psutil.Process()
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self.start = self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> dict[str, int]:
        out = {"rss": self.process.memory_info().rss, "anon": 0, "file": 0}
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith(("RssAnon:", "RssFile:")):
                        key = "anon" if line.startswith("RssAnon") else "file"
                        out[key] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, value in self._sample().items():
                self.peak[key] = max(self.peak[key], value)
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _chunks(rows: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _evict(paths: list[Path]) -> bool:
    """Drop these files' pages from the page cache (only theirs); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


# ------------------------------------------------------------------------------ the steps


def _load_bgr(path: Path) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)


def bare_decode(paths: list[Path], pool: ThreadPoolExecutor) -> Clock:
    clock = Clock()
    for rows in _chunks(list(range(len(paths))), F._CHUNK):
        with clock.run():
            list(pool.map(_load_bgr, [paths[r] for r in rows]))
    return clock


def roi_detection(paths: list[Path], pool: ThreadPoolExecutor, cfg: FeaturesConfig) -> Clock:
    clock = Clock()
    for rows in _chunks(list(range(len(paths))), F._CHUNK):
        with clock.run():
            for image in pool.map(_load_bgr, [paths[r] for r in rows]):
                detect_roi(image, cfg.roi)
    return clock


def bare_cnn_chunk(
    paths: list[Path],
    pool: ThreadPoolExecutor,
    encoder: PatchEncoder,
    grid: int,
    batch: int,
    decode: Clock,
    forward: Clock,
) -> None:
    """Decode, cut a fixed grid x grid (no RoI), preprocess + forward in batches: nothing else."""
    with decode.run():
        images = list(pool.map(_load_bgr, paths))
    with forward.run():
        crops = []
        for image in images:
            rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            h, w = rgb.shape[:2]
            crops += [rgb[y0:y1, x0:x1] for x0, y0, x1, y1 in grid_boxes((0, 0, w, h), grid)]
        with torch.inference_mode():
            for start in range(0, len(crops), batch):
                encoder(encoder.preprocess(crops[start : start + batch]))


def stage_variant_chunk(
    rows: list[int],
    paths: list[Path],
    pool: ThreadPoolExecutor,
    encoder: PatchEncoder,
    cfg: FeaturesConfig,
    batch: int,
    out: np.ndarray,
    boxes: np.ndarray,
    clocks: dict[str, Clock],
) -> float:
    """The stage's own code path for the `roi` variant on these rows: its float16 error."""
    with clocks["decode"].run():
        loaded = list(pool.map(F._read, [paths[r] for r in rows]))
        decoded = list(pool.map(F._decode, [data for data, _, _ in loaded]))
    with clocks["roi"].run():
        rgbs = []
        for r, image in zip(rows, decoded, strict=True):
            boxes[r] = detect_roi(image, cfg.roi).box
            rgbs.append((r, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)))
    with clocks["encode"].run():
        return F._encode_rows(rgbs, boxes, cfg.grid, encoder, batch, {"roi": out})


@dataclass
class CnnSteps:
    bare: dict[str, Clock]
    stage: dict[str, Clock]
    fp16_error: float
    chunk_ratios: list[float]  # stage / bare wall time of each chunk, measured back to back


def cnn_steps(
    paths: list[Path],
    pool: ThreadPoolExecutor,
    encoder: PatchEncoder,
    cfg: FeaturesConfig,
    batch: int,
    work: Path,
) -> CnnSteps:
    """Steps 3 and 4, interleaved chunk by chunk; the order within a chunk alternates."""
    n = len(paths)
    bare = {"decode": Clock(), "forward": Clock()}
    stage = {"decode": Clock(), "roi": Clock(), "encode": Clock()}
    out = np.lib.format.open_memmap(
        work / "bench_patches.npy", "w+", np.float16, (n, cfg.n_patches, encoder.feature_dim)
    )
    boxes = np.zeros((n, 4), np.int64)
    worst = 0.0
    ratios = []
    for k, rows in enumerate(_chunks(list(range(n)), F._CHUNK)):
        chunk = [paths[r] for r in rows]
        bare_before = sum(bare.values(), Clock()).wall
        stage_before = sum(stage.values(), Clock()).wall
        for first in (k % 2 == 0, k % 2 == 1):
            if first:
                bare_cnn_chunk(chunk, pool, encoder, cfg.grid, batch, *bare.values())
            else:
                error = stage_variant_chunk(
                    rows, paths, pool, encoder, cfg, batch, out, boxes, stage
                )
                worst = max(worst, error)
        ratios.append(
            (sum(stage.values(), Clock()).wall - stage_before)
            / (sum(bare.values(), Clock()).wall - bare_before)
        )
    del out
    return CnnSteps(bare, stage, worst, ratios)


class PairedBare:
    """Stands in for `features._encode_rows` during step 5: after the stage encodes a chunk, the
    bare CNN runs on the same images (its decode and forward timed once, the forward counted
    once per variant), and that time is kept off the stage's clock. So the stage and its bare
    cost are measured back to back, chunk by chunk, and see the same load from other processes.
    """

    def __init__(
        self,
        paths: list[Path],
        pool: ThreadPoolExecutor,
        encoder: PatchEncoder,
        batch: int,
        n_variants: int,
    ) -> None:
        self.paths, self.pool, self.encoder, self.batch = paths, pool, encoder, batch
        self.n_variants = n_variants
        self.original = F._encode_rows
        self.paused = Clock()  # the bare runs, to take off the stage's clock
        self.decode, self.forward = Clock(), Clock()
        self.stage_chunks: list[float] = []  # stage wall time per chunk, the first one excluded
        self.bare_chunks: list[float] = []
        self._resumed: float | None = None
        self.n_images = 0

    def __call__(
        self,
        rgbs: list[tuple[int, np.ndarray]],
        boxes: np.ndarray,
        grid: int,
        encoder: PatchEncoder,
        batch: int | None,
        arrays: dict[str, np.ndarray],
    ) -> float:
        worst = self.original(rgbs, boxes, grid, encoder, batch, arrays)
        stopped = time.perf_counter()
        with self.paused.run():
            decode, forward = Clock(), Clock()
            chunk = [self.paths[r] for r, _ in rgbs]
            bare_cnn_chunk(chunk, self.pool, self.encoder, grid, self.batch, decode, forward)
        self.decode += decode
        self.forward += forward
        self.n_images += len(rgbs)
        if self._resumed is not None:  # the first chunk also carries the stage's set-up
            self.stage_chunks.append(stopped - self._resumed)
            self.bare_chunks.append(decode.wall + self.n_variants * forward.wall)
        self._resumed = time.perf_counter()
        return worst

    def __enter__(self) -> PairedBare:
        F._encode_rows = self
        return self

    def __exit__(self, *exc: object) -> None:
        F._encode_rows = self.original


def pixel_steps(
    paths: list[Path], ids: list[str], store_dir: Path, cfg: FeaturesConfig
) -> dict[str, object]:
    """Step 6: pixel tokens on the fly vs from the stored uint8 memmap, shuffled order."""
    store = F.FeatureStore(store_dir)
    pixels_file = store_dir / F.PIXELS
    order = np.random.default_rng(SEED).permutation(len(paths))
    rows = [store.row_of[ids[i]] for i in order]

    def on_the_fly() -> Clock:
        clock = Clock()
        with clock.run():
            for i in order:
                rgb = cv2.cvtColor(_load_bgr(paths[i]), cv2.COLOR_BGR2RGB)
                F.pixel_tokens(rgb, cfg.pixel_size, cfg.pixel_patch)
        return clock

    def stored() -> Clock:
        clock = Clock()
        with clock.run():
            array = np.load(pixels_file, mmap_mode="r")  # opening it is part of the cost
            for r in rows:
                np.array(array[r])  # a copy, as a data loader hands over
        del array
        return clock

    def warm(read: Callable[[], Clock]) -> Clock:
        read()  # fills the page cache
        return read()

    clocks = {"fly_warm": warm(on_the_fly), "store_warm": warm(stored)}
    evicted = _evict(paths) and _evict([pixels_file])
    clocks["fly_cold"] = on_the_fly()
    clocks["store_cold"] = stored()
    # The two must give the same tokens, or the comparison is moot.
    array = store.pixels()
    check = order[: min(200, len(order))]
    same = all(
        np.array_equal(
            F.pixel_tokens(
                cv2.cvtColor(_load_bgr(paths[i]), cv2.COLOR_BGR2RGB),
                cfg.pixel_size,
                cfg.pixel_patch,
            ),
            array[store.row_of[ids[i]]],
        )
        for i in check
    )
    del array
    n = len(order)
    jpeg_bytes = sum(p.stat().st_size for p in paths)
    return {
        "n_samples": n,
        "order": f"shuffled (numpy default_rng({SEED}).permutation), one sample at a time",
        "note": "one thread, one sample at a time, as in one data-loader worker; warm = the "
        "files in the page cache, cold = evicted with posix_fadvise(DONTNEED) first (the host "
        "under a VM may still cache them)",
        "page_cache_evicted_for_cold": evicted,
        **{k: c.figures(n, "samples") for k, c in clocks.items()},
        "identical_tokens_checked": len(check),
        "identical_tokens": same,
        "store_bytes": pixels_file.stat().st_size,
        "store_bytes_per_product": pixels_file.stat().st_size / len(store.index),
        "jpeg_bytes_per_product": jpeg_bytes / n,
        "token_shape": [cfg.n_pixel_tokens, cfg.pixel_dim],
    }


# ------------------------------------------------------------------------------ report


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _table(r: dict) -> str:
    s, px, q, qc = r["steps"], r["pixels"], r["ratios"], r["cpu_ratios"]

    def row(name: str, key: str, ratio: str, notes: str, source: dict = s) -> tuple[str, ...]:
        step = source[key]
        rate = step.get("images_per_second", step.get("samples_per_second", 0.0))
        cpu = f"{qc[ratio]:.2f}" if ratio in qc else ("1.00" if ratio == "ref" else "")
        shown = f"{q[ratio]:.2f}" if ratio in q else ("1.00" if ratio == "ref" else "")
        return name, f"{rate:,.1f}", shown, cpu, f"{step['foreign_cpu_share']:.0%}", notes

    rows = [
        ("step", "per s", "ratio", "cpu", "other", "notes"),
        row("1 bare decode", "bare_decode", "ref", "read + imdecode: reference for 2"),
        row("2 RoI detection", "roi", "roi_vs_decode",
            f"decode + detect_roi, vs 1 (RoI alone {s['roi_only_ms']:.2f} ms/img)"),
        row("3 bare CNN", "bare_cnn", "ref",
            f"decode + 16 fixed crops + forward: {s['bare_cnn']['crops_per_second']:,.0f} crops/s"),
        row("4 patches, 1 variant", "stage_variant", "variant_vs_bare_cnn",
            f"stage code (roi), vs 3; chunk median {q['variant_vs_bare_cnn_chunk_median']:.2f}x; "
            f"encode alone {q['variant_encode_vs_bare_forward']:.2f}x bare forward; "
            f"RoI {s['stage_variant']['roi_share']:.0%} of it"),
        row("5 build_features", "build_features", "stage_vs_bare",
            f"both variants, vs 3b decode + 2 x 3b forward; chunk median "
            f"{q['stage_vs_bare_chunk_median']:.2f}x; {q['stage_vs_bare_plus_roi']:.2f}x with RoI "
            f"in the reference; {q['stage_vs_bare_unpaired']:.2f}x vs 1 + 2 x 3 forward"),
        row("3b bare CNN in 5, paired", "paired_bare_cnn", "paired_bare_cnn_vs_step3",
            "as 3, on each chunk right after the stage did it; vs 3 (machine drift)"),
        row("5b rebuild, all reused", "rebuild_reused", "",
            "same folder again: every row copied, none computed"),
        row("6 pixels on the fly, warm", "fly_warm", "ref",
            "samples/s: read + decode + resize + tile", px),
        row("6 pixels on the fly, cold", "fly_cold", "",
            "samples/s, JPEGs evicted from the page cache", px),
        row("6 pixels from store, warm", "store_warm", "",
            f"samples/s, uint8 memmap rows: {q['pixels_store_vs_fly_warm']:.1f}x on the fly", px),
        row("6 pixels from store, cold", "store_cold", "",
            f"samples/s, store evicted: {q['pixels_store_vs_fly_cold']:.1f}x on the fly (cold)",
            px),
    ]  # fmt: skip
    width = [max(len(cells[i]) for cells in rows) for i in range(5)]
    m, mach = r["memory"], r["machine"]
    lines = [
        f"features stage on {r['n_products']:,} products ({r['cnn_products']:,} in steps 3/4), "
        f"{mach['cpus']} CPU(s), torch threads {mach['torch_threads']}, "
        f"load {mach['loadavg_start'][0]:.2f} -> {mach['loadavg_end'][0]:.2f}",
        "per s: images (6: samples) per second; ratio: wall time over the reference (>1 is "
        "slower); cpu: the same in process CPU seconds; other: CPU share other processes used",
    ]
    for cells in rows:
        padded = [cells[0].ljust(width[0])] + [
            c.rjust(width[i]) for i, c in enumerate(cells[1:5], 1)
        ]
        lines.append("  ".join([*padded, cells[5]]).rstrip())
    lines.append(
        f"memory: build_features peak RSS {m['stage_peak_rss'] / 2**20:,.0f} MiB "
        f"(+{m['stage_rss_growth'] / 2**20:,.0f} MiB over {m['stage_rss_before'] / 2**20:,.0f}; "
        f"peak anon {m['stage_peak_anon'] / 2**20:,.0f} (+{m['stage_anon_growth'] / 2**20:,.0f}), "
        f"peak file-backed {m['stage_peak_file'] / 2**20:,.0f} (the memmapped store)); "
        f"process ru_maxrss {m['process_ru_maxrss'] / 2**20:,.0f} MiB"
    )
    busy = s["build_features"]["foreign_cpu_share"]
    if busy > 0.1:
        lines.append(
            f"warning: other processes used {busy:.0%} of the CPUs during build_features: the "
            "rates are depressed; the paired ratios (5, chunk medians) still compare like with like"
        )
    speedup = q["pixels_store_vs_fly_warm"]
    faster = "the store" if speedup > 1 else "on the fly"
    lines.append(
        f"pixels: {faster} is faster, {max(speedup, 1 / speedup):.1f}x warm, "
        f"{max(q['pixels_store_vs_fly_cold'], 1 / q['pixels_store_vs_fly_cold']):.1f}x cold; "
        f"store {px['store_bytes_per_product'] / 1e3:,.1f} kB/product vs JPEG "
        f"{px['jpeg_bytes_per_product'] / 1e3:,.1f} kB; same tokens: {px['identical_tokens']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="the world's data dir")
    parser.add_argument(
        "--products",
        type=Path,
        default=ROOT / "artifacts" / "validate" / "products.parquet",
        help="the validated products table",
    )
    parser.add_argument("--limit", type=int, help="use the first N products (default: all)")
    parser.add_argument("--cnn-limit", type=int, help="use fewer products for steps 3 and 4")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=RESULTS / "features.json")
    args = parser.parse_args()

    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    cfg = load_params(args.params).features
    products = pd.read_parquet(args.products)
    if args.limit:
        products = products.head(args.limit)
    products = products.reset_index(drop=True)
    n = len(products)
    n_cnn = min(n, args.cnn_limit or n)
    ids = products.product_id.astype(str).tolist()
    paths = [args.data / p for p in products.image_path.astype(str)]
    truth_file = args.data / "truth" / "products.parquet"
    truth = pd.read_parquet(truth_file) if truth_file.exists() else None

    for path in paths:  # every step then reads from the page cache, the first one included
        path.read_bytes()
    encoder = load_patch_encoder(cfg.backbone, cfg.device, cfg.patch_input)
    batch = cfg.batch_size or encoder.default_batch_size()
    warm = [np.zeros((cfg.patch_input, cfg.patch_input, 3), np.uint8)] * batch
    encoder.encode(warm, batch_size=batch)  # warm-up: allocator, kernels

    with tempfile.TemporaryDirectory(prefix="ace-bench-features-") as tmp:
        work = Path(tmp)
        with ThreadPoolExecutor(cfg.read_workers) as pool:
            print(f"1-2: decode and RoI on {n} images", flush=True)
            decode = bare_decode(paths, pool)
            roi = roi_detection(paths, pool, cfg)
            print(f"3-4: bare CNN and one stage variant on {n_cnn} images", flush=True)
            cnn = cnn_steps(paths[:n_cnn], pool, encoder, cfg, batch, work)
            bare, variant = cnn.bare, cnn.stage

            print(f"5: build_features on {n} images", flush=True)
            store_dir = work / "features"
            stage_gross, rebuild = Clock(), Clock()
            paired = PairedBare(paths, pool, encoder, batch, len(cfg.variants))
            with paired, MemorySampler() as memory, stage_gross.run():
                report = F.build_features(products, args.data, store_dir, cfg, truth, False)
            stage = stage_gross - paired.paused
            with rebuild.run():
                reused = F.build_features(products, args.data, store_dir, cfg, truth, False)

        print(f"6: pixel tokens on {n} samples", flush=True)
        pixels = pixel_steps(paths, ids, store_dir, cfg)
        patch_bytes = {
            v: (store_dir / F.patches_file(v)).stat().st_size / report.n_products
            for v in cfg.variants
        }

    # Per-image costs, so steps on --cnn-limit products combine with steps on all of them.
    k = len(cfg.variants)
    n_paired = max(1, paired.n_images)
    paired_total = paired.decode + paired.forward
    per = {
        "decode": decode.per(n),
        "roi": roi.per(n),
        "bare_cnn": sum(bare.values(), Clock()).per(n_cnn),
        "bare_forward": bare["forward"].per(n_cnn),
        "variant": sum(variant.values(), Clock()).per(n_cnn),
        "variant_encode": variant["encode"].per(n_cnn),
        "stage": stage.per(n),
        "paired_bare_cnn": paired_total.per(n_paired),
        "paired_decode": paired.decode.per(n_paired),
        "paired_forward": paired.forward.per(n_paired),
    }
    per["roi_only"] = Clock(
        max(0.0, per["roi"].wall - per["decode"].wall), max(0.0, per["roi"].cpu - per["decode"].cpu)
    )
    reference = per["paired_decode"] + per["paired_forward"].scaled(k)
    unpaired = per["decode"] + per["bare_forward"].scaled(k)
    literal = per["decode"] + per["bare_cnn"].scaled(k)
    pairs = {
        "roi_vs_decode": (per["roi"], per["decode"]),
        "variant_vs_bare_cnn": (per["variant"], per["bare_cnn"]),
        "variant_encode_vs_bare_forward": (per["variant_encode"], per["bare_forward"]),
        "stage_vs_bare": (per["stage"], reference),
        "stage_vs_bare_plus_roi": (per["stage"], reference + per["roi_only"]),
        "stage_vs_bare_unpaired": (per["stage"], unpaired),
        "stage_vs_bare_literal": (per["stage"], literal),
        "paired_bare_cnn_vs_step3": (per["paired_bare_cnn"], per["bare_cnn"]),
    }
    ratios = {name: _ratio(a.wall, b.wall) for name, (a, b) in pairs.items()}
    chunk_ratios = [s / b for s, b in zip(paired.stage_chunks, paired.bare_chunks, strict=True)]
    ratios["variant_vs_bare_cnn_chunk_median"] = float(np.median(cnn.chunk_ratios))
    ratios["stage_vs_bare_chunk_median"] = (
        float(np.median(chunk_ratios)) if chunk_ratios else float("nan")
    )
    ratios["pixels_store_vs_fly_warm"] = _ratio(
        pixels["fly_warm"]["seconds"], pixels["store_warm"]["seconds"]
    )
    ratios["pixels_store_vs_fly_cold"] = _ratio(
        pixels["fly_cold"]["seconds"], pixels["store_cold"]["seconds"]
    )
    cpu_ratios = {name: _ratio(a.cpu, b.cpu) for name, (a, b) in pairs.items()}
    crops = n_cnn * cfg.n_patches
    variant_total = sum(variant.values(), Clock())
    result = {
        "n_products": n,
        "cnn_products": n_cnn,
        "cnn_limited": n_cnn < n,
        "data": str(args.data),
        "products": str(args.products),
        "settings": cfg.model_dump(mode="json"),
        "backbone": encoder.name,
        "batch_size": batch,
        "chunk": F._CHUNK,
        "target_ratio": TARGET,
        "steps": {
            "bare_decode": decode.figures(n),
            "roi": roi.figures(n),
            "roi_only_ms": 1e3 * per["roi_only"].wall,
            "bare_cnn": {
                **(bare["decode"] + bare["forward"]).figures(n_cnn),
                "crops_per_second": crops / (bare["decode"] + bare["forward"]).wall,
                "decode_seconds": bare["decode"].wall,
                "forward_seconds": bare["forward"].wall,
                "forward_crops_per_second": crops / bare["forward"].wall,
            },
            "stage_variant": {
                **variant_total.figures(n_cnn),
                "variant": "roi",
                "crops_per_second": crops / variant_total.wall,
                **{f"{name}_seconds": c.wall for name, c in variant.items()},
                "roi_share": variant["roi"].wall / variant_total.wall,
                "fp16_max_rel_error": cnn.fp16_error,
            },
            "build_features": {
                **stage.figures(n),
                "gross_seconds": stage_gross.wall,
                "paired_bare_seconds_taken_off": paired.paused.wall,
                "report_seconds_incl_paired_bare": report.seconds,
                "report": report.metrics(),
            },
            "paired_bare_cnn": {
                **paired_total.figures(n_paired),
                "decode_seconds": paired.decode.wall,
                "forward_seconds": paired.forward.wall,
                "stage_chunk_seconds": paired.stage_chunks,
                "bare_chunk_seconds": paired.bare_chunks,
            },
            "rebuild_reused": {
                **rebuild.figures(n),
                "n_reused": reused.n_reused,
                "n_computed": reused.n_computed,
            },
        },
        "reference": {
            "stage_bare_seconds_per_image": reference.wall,
            "stage_bare_cpu_seconds_per_image": reference.cpu,
            "definition": "bare decode + 2 x bare CNN forward part (crop + preprocess + forward), "
            "both measured inside step 5 right after the stage's own chunk (paired_bare_cnn)",
            "unpaired_seconds_per_image": unpaired.wall,
            "unpaired_definition": "step 1 + 2 x the forward part of step 3, measured before 5",
            "literal_seconds_per_image": literal.wall,
            "literal_definition": "step 1 + 2 x the whole of step 3 (decode counted 3 times)",
        },
        "ratios": ratios,
        "ratios_note": "wall-clock time of the step over its reference (>1: slower). The "
        "*_chunk_median ratios are medians over 64-image chunks, each chunk's pair measured back "
        "to back, so robust to bursts of load from other processes; stage_vs_bare_chunk_median "
        "leaves out the first chunk (encoder load) and the tail (index, sample sheet, swap)",
        "cpu_ratios": cpu_ratios,
        "cpu_ratios_note": "the same ratios in process CPU seconds (all threads)",
        "within_target": ratios["stage_vs_bare"] <= TARGET,
        "memory": {
            "stage_rss_before": memory.start["rss"],
            "stage_peak_rss": memory.peak["rss"],
            "stage_rss_growth": memory.peak["rss"] - memory.start["rss"],
            "stage_anon_before": memory.start["anon"],
            "stage_peak_anon": memory.peak["anon"],
            "stage_anon_growth": memory.peak["anon"] - memory.start["anon"],
            "stage_file_before": memory.start["file"],
            "stage_peak_file": memory.peak["file"],
            "process_ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "note": "RSS sampled every 10 ms in a thread during build_features (which includes "
            "the paired bare CNN batches, a few tens of MB); file-backed pages are mostly the "
            "memory-mapped store being written (reclaimable); ru_maxrss is the whole run's peak",
        },
        "pixels": pixels,
        "patch_store_bytes_per_product": patch_bytes,
        "machine": {
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "torch_threads": torch.get_num_threads(),
            "cv2_threads": cv2.getNumThreads(),
            "read_workers": cfg.read_workers,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "opencv": cv2.__version__,
            "platform": platform.platform(),
            "memory_total": psutil.virtual_memory().total,
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg(),
        },
        "run_seconds": time.perf_counter() - started,
    }
    print(_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        shown = args.out.resolve().relative_to(ROOT)
    except ValueError:
        shown = args.out
    print(f"wrote {shown} in {result['run_seconds']:.0f} s")


if __name__ == "__main__":
    main()
