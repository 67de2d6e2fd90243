"""ANN index recall@100 against exact search and queries/s per index type, demo and 1M scale.

    python benchmarks/bench_index.py                                   # demo + 1M synthetic
    python benchmarks/bench_index.py --artifacts /tmp/fresh/artifacts  # another run's artifacts
    python benchmarks/bench_index.py --skip-demo --n 100000            # quick synthetic check

Every index is built by `components.retrieval.index.build_index`, the function the `index` stage
ships, from params.yaml `index` with a few settings changed. Two scales:
  - demo: the evaluate stage's product embeddings (artifacts/evaluate/product_embeddings.npy)
    searched with the hot-cache teacher query embeddings (artifacts/index/hot_cache.npy); the
    params.yaml settings apply unchanged (nlist 0 = automatic);
  - synthetic: --n (1,000,000) 128-d vectors from a Gaussian mixture, deterministic by --seed:
    --centres centres drawn from N(0, diag(lambda)) with lambda_j proportional to j^-decay (a
    power-law spectrum: real embeddings put most variance in few directions), each point its
    centre plus --spread times N(0, diag(lambda)) noise, mixture weights Dirichlet(2), then
    L2-normalised. The --n-queries queries are fresh draws from the same mixture (seed + 1), not
    members of the base set. IVF uses --nlist cells, trained on all base vectors as build_index
    does. Uniform vectors on the sphere would be a pathological worst case and are not used.
For each index type the search-time knob is swept without rebuilding (efSearch for hnsw, nprobe
for ivf / ivfpq). Each row: build seconds (at --build-threads), serialized size, recall@100
against the exact flat top-100 (mean over queries of |ANN top-100 & exact top-100| / 100), and
queries/s of one batched search of all queries (median of repeats, at --threads search threads)
with its speed-up over the flat index's queries/s of the same run (flat is timed at the start
and end of each scale; the median of all its repeats is used). The cheapest setting reaching
recall >= 0.95 is marked with whether it is >= 10x flat. An extra `ivfpq+refine` row re-ranks
--refine-factor x 100 IVF-PQ candidates exactly (faiss IndexRefineFlat): not what build_index
ships, shown as the remedy if IVF-PQ alone falls short. Prints a table and writes
benchmarks/results/index.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from components.config import IndexConfig, load_params
from components.retrieval.ann import build_index

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
K = 100
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0
EF_SEARCH = (100, 128, 192, 256, 384, 512)  # faiss searches max(efSearch, k): below 100 = 100
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CHUNK = 100_000  # rows generated at a time (fixed: the data depend on it)
HEARTBEAT = 30.0  # seconds between progress lines during a build


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def heartbeat(what: str) -> Iterator[None]:
    """Print a line every HEARTBEAT seconds while a long FAISS call runs (it releases the GIL)."""
    stop = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not stop.wait(HEARTBEAT):
            log(f"  ... {what}: {time.perf_counter() - start:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def mixture(
    n: int, n_queries: int, dim: int, centres: int, spread: float, decay: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(base (n, dim), queries (n_queries, dim)): L2-normalised Gaussian-mixture draws."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, dim + 1, dtype=np.float64) ** (-decay / 2)
    scale = (scale / np.sqrt(np.mean(scale**2))).astype(np.float32)  # mean variance 1
    means = rng.standard_normal((centres, dim), dtype=np.float32) * scale
    weights = rng.dirichlet(np.full(centres, 2.0))

    def draw(count: int, gen: np.random.Generator) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for lo in range(0, count, CHUNK):
            m = min(CHUNK, count - lo)
            labels = gen.choice(centres, m, p=weights)
            x = means[labels] + spread * gen.standard_normal((m, dim), dtype=np.float32) * scale
            out[lo : lo + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n, rng), draw(n_queries, np.random.default_rng(seed + 1))


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approximate top-k & exact top-k| / k (-1 = no result, never hits)."""
    k = exact.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact, strict=True)]
    return float(np.mean(hits)) / k


def timed_search(
    index: faiss.Index, queries: np.ndarray, repeats: int, min_seconds: float
) -> tuple[np.ndarray, list[float], list[float]]:
    """(top-K ids, wall seconds per repeat, CPU seconds per repeat) of batched searches.

    A first untimed search warms up and gives the ids; then at least `repeats` timed ones, more
    (up to 50) while they add up to less than `min_seconds`.
    """
    ids = index.search(queries, K)[1]
    walls: list[float] = []
    cpus: list[float] = []
    while len(walls) < repeats or (sum(walls) < min_seconds and len(walls) < 50):
        wall, cpu = time.perf_counter(), time.process_time()
        index.search(queries, K)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return ids, walls, cpus


def build(vectors: np.ndarray, cfg: IndexConfig, threads: int, label: str) -> tuple:
    """(index, build seconds, serialized bytes), built at `threads` FAISS threads."""
    faiss.omp_set_num_threads(threads)
    log(f"building {label} on {len(vectors):,} vectors ({threads} threads)")
    start = time.perf_counter()
    with heartbeat(f"building {label}"):
        index = build_index(vectors, cfg)
    seconds = time.perf_counter() - start
    size = len(faiss.serialize_index(index))
    log(f"  built {label} in {seconds:.1f} s, {size / 2**20:.1f} MiB")
    return index, seconds, size


def bench_scale(
    scale: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    base: IndexConfig,
    args: argparse.Namespace,
) -> tuple[list[dict], dict]:
    """Rows of (index, setting) measurements at one scale, and the flat timing details."""
    n = len(vectors)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    rows: list[dict] = []

    def search(index: faiss.Index) -> tuple[np.ndarray, list[float], list[float]]:
        faiss.omp_set_num_threads(args.threads)
        return timed_search(index, queries, args.repeats, args.min_seconds)

    def row(kind: str, build_params: str, setting: str, built: tuple, timing: tuple) -> dict:
        ids, walls, cpus = timing
        entry = {
            "scale": scale,
            "index": kind,
            "build_params": build_params,
            "setting": setting,
            "build_seconds": built[1],
            "size_bytes": built[2],
            "recall_at_100": recall_at_k(ids, exact),
            "qps": nq / float(np.median(walls)),
            "cpu_ms_per_query": 1000 * float(np.median(cpus)) / nq,
            "repeats": len(walls),
        }
        log(
            f"  {kind:12s} {setting:13s} recall@100 {entry['recall_at_100']:.4f}  "
            f"{entry['qps']:10.1f} q/s"
        )
        rows.append(entry)
        return entry

    log(f"== {scale}: {n:,} x {vectors.shape[1]} vectors, {nq:,} queries")
    flat = build(vectors, base.model_copy(update={"type": "flat"}), args.build_threads, "flat")
    exact, walls, cpus = search(flat[0])
    flat_walls = list(walls)
    flat_row = row("flat", "", "exact", flat, (exact, walls, cpus))

    cfg = base.model_copy(update={"type": "hnsw"})
    hnsw_params = f"M={cfg.hnsw_m} efC={cfg.ef_construction}"
    built = build(vectors, cfg, args.build_threads, f"hnsw {hnsw_params}")
    for ef in sorted({*EF_SEARCH, cfg.ef_search}):
        built[0].hnsw.efSearch = ef
        row("hnsw", hnsw_params, f"efSearch={ef}", built, search(built[0]))
    del built

    nlist = base.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))  # as build_index does
    probes = sorted({p for p in (*NPROBE, base.nprobe, nlist) if p <= min(nlist, max(NPROBE))})
    for kind in ("ivf", "ivfpq"):
        cfg = base.model_copy(update={"type": kind})
        params = f"nlist={nlist}" + (f" PQ{cfg.pq_m}x{cfg.pq_bits}" if kind == "ivfpq" else "")
        built = build(vectors, cfg, args.build_threads, f"{kind} {params}")
        ivf = faiss.extract_index_ivf(built[0])
        for nprobe in probes:
            ivf.nprobe = nprobe
            row(kind, params, f"nprobe={nprobe}", built, search(built[0]))
        if kind == "ivfpq" and args.refine_factor:
            start = time.perf_counter()
            refine = faiss.IndexRefineFlat(built[0], faiss.swig_ptr(vectors))
            refine.k_factor = args.refine_factor
            seconds = built[1] + time.perf_counter() - start
            refined = (refine, seconds, len(faiss.serialize_index(refine)))
            params += f" refine k_factor={args.refine_factor}"
            for nprobe in probes:
                ivf.nprobe = nprobe
                row("ivfpq+refine", params, f"nprobe={nprobe}", refined, search(refine))
            del refine, refined
        del ivf, built

    _, walls, _ = search(flat[0])  # flat again at the end: load may have changed
    flat_walls += walls
    flat_qps = nq / float(np.median(flat_walls))
    flat_row["qps"] = flat_qps
    for entry in rows:
        entry["speedup"] = entry["qps"] / flat_qps
    flat_info = {
        "qps": flat_qps,
        "qps_start": nq / float(np.median(flat_walls[: len(flat_walls) - len(walls)])),
        "qps_end": nq / float(np.median(walls)),
    }
    return rows, flat_info


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per ANN index type: its cheapest setting with recall >= target (rows are cheapest first),
    else its best recall; marks rows with `chosen` and returns {index: summary}."""
    summary: dict[str, dict] = {}
    for kind in dict.fromkeys(r["index"] for r in rows if r["index"] != "flat"):
        group = [r for r in rows if r["index"] == kind]
        meeting = [r for r in group if r["recall_at_100"] >= TARGET_RECALL]
        pick = meeting[0] if meeting else max(group, key=lambda r: r["recall_at_100"])
        for r in group:
            r["chosen"] = r is pick
        summary[kind] = {
            "setting": pick["setting"],
            "build_params": pick["build_params"],
            "recall_at_100": pick["recall_at_100"],
            "qps": pick["qps"],
            "speedup": pick["speedup"],
            "meets_recall": bool(meeting),
            "meets_speedup": pick["speedup"] >= TARGET_SPEEDUP,
        }
    return summary


def print_table(rows: list[dict]) -> None:
    header = (
        "| scale | index | build params | setting | build s | size MiB | recall@100 | q/s "
        "| x flat | |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        mark = ""
        if r.get("chosen"):
            met = r["recall_at_100"] >= TARGET_RECALL
            fast = "yes" if r["speedup"] >= TARGET_SPEEDUP else "no"
            mark = f"<- cheapest >= {TARGET_RECALL}, >= 10x: {fast}" if met else "<- best (short)"
        print(
            f"| {r['scale']} | {r['index']} | {r['build_params']} | {r['setting']} "
            f"| {r['build_seconds']:.1f} | {r['size_bytes'] / 2**20:.1f} "
            f"| {r['recall_at_100']:.4f} | {r['qps']:,.0f} | {r['speedup']:.1f} | {mark} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=None, help="default: params.yaml's")
    parser.add_argument("--demo-products", default="evaluate/product_embeddings.npy")
    parser.add_argument("--demo-queries", default="index/hot_cache.npy")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic base vectors")
    parser.add_argument("--n-queries", type=int, default=1000, help="synthetic queries")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--centres", type=int, default=3000)
    parser.add_argument("--spread", type=float, default=0.6, help="noise scale around a centre")
    parser.add_argument("--decay", type=float, default=1.0, help="variance spectrum j^-decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nlist", type=int, default=4096, help="synthetic IVF cells")
    parser.add_argument("--hnsw-m", type=int, default=None, help="synthetic; default params'")
    parser.add_argument("--ef-construction", type=int, default=None, help="synthetic")
    parser.add_argument("--refine-factor", type=int, default=16, help="0 = no ivfpq+refine")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads for searches")
    parser.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per setting")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="... at least this long")
    args = parser.parse_args()
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    os.chdir(ROOT)
    params = load_params(ROOT / "params.yaml")
    base = params.index
    artifacts = args.artifacts or ROOT / params.paths.artifacts_dir
    log(
        f"faiss {faiss.__version__}, {os.cpu_count()} cores, search threads {args.threads}, "
        f"build threads {args.build_threads}, load {load_start:.2f}"
    )

    rows: list[dict] = []
    scales: dict[str, dict] = {}
    if not args.skip_demo:
        products_file = artifacts / args.demo_products
        queries_file = artifacts / args.demo_queries
        products = np.ascontiguousarray(np.load(products_file), dtype=np.float32)
        demo_queries = np.load(queries_file)
        found, flat = bench_scale("demo", products, demo_queries, base, args)
        scales["demo"] = {
            "products": str(products_file),
            "queries": str(queries_file),
            "n": len(products),
            "n_queries": len(demo_queries),
            "dim": int(products.shape[1]),
            "index_config": base.model_dump(mode="json"),
            "flat": flat,
            "chosen": choose(found),
        }
        rows += found
        del products
    if not args.skip_synthetic:
        log(f"generating {args.n:,} + {args.n_queries:,} synthetic vectors")
        start = time.perf_counter()
        vectors, queries = mixture(
            args.n, args.n_queries, args.dim, args.centres, args.spread, args.decay, args.seed
        )
        log(f"  generated in {time.perf_counter() - start:.1f} s")
        update = {"nlist": args.nlist}
        if args.hnsw_m:
            update["hnsw_m"] = args.hnsw_m
        if args.ef_construction:
            update["ef_construction"] = args.ef_construction
        cfg = base.model_copy(update=update)
        found, flat = bench_scale(f"synthetic {args.n // 1000}k", vectors, queries, cfg, args)
        scales["synthetic"] = {
            "generator": {
                "kind": "gaussian mixture, power-law spectrum, L2-normalised",
                "centres": args.centres,
                "spread": args.spread,
                "decay": args.decay,
                "weights": "dirichlet(2)",
                "seed_base": args.seed,
                "seed_queries": args.seed + 1,
            },
            "n": args.n,
            "n_queries": args.n_queries,
            "dim": args.dim,
            "index_config": cfg.model_dump(mode="json"),
            "flat": flat,
            "chosen": choose(found),
        }
        rows += found
        del vectors, queries

    print()
    print(f"faiss {faiss.__version__}, {args.threads} search thread(s), k = {K}")
    print_table(rows)
    wall = time.perf_counter() - started
    load_end = os.getloadavg()[0]
    print(f"wall time {wall / 60:.1f} min, load average {load_start:.2f} -> {load_end:.2f}")
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "cores": os.cpu_count(),
            "search_threads": args.threads,
            "build_threads": args.build_threads,
            "faiss": faiss.__version__,
            "numpy": np.__version__,
            "load_average_1m_start": load_start,
            "load_average_1m_end": load_end,
        },
        "k": K,
        "target": {"recall_at_100": TARGET_RECALL, "speedup_over_flat": TARGET_SPEEDUP},
        "args": {key: str(value) for key, value in vars(args).items()},
        "scales": scales,
        "rows": rows,
        "wall_seconds": wall,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
