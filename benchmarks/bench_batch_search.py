"""Batch search against one query at a time: queries/s through the same served bundle.

    cd PROJECT && python /path/to/benchmarks/bench_batch_search.py   # a project with a champion

Loads the registered model once (`--model`, default `models:/ace@champion`; the tracking store
is `MLFLOW_TRACKING_URI`, else the project's `mlruns/mlflow.db`, as `components.ops.tracking` has
it) and takes `--queries` distinct queries from the project's validated impressions: the test days'
first, then the other days'. Then, in alternating rounds (which goes first alternates too, so
machine load hits both alike), it searches them all with k = `--k`

- batched: `components.serving.search.search_batches` (what `ace search --file` runs: requests of at
  most the bundle's max_rows_per_request queries, each validated first) and `result_table`
  (the long table it writes), and
- one at a time: one `model.predict` of a one-row frame per query (what `ace search QUERY` or a
  client sending one query per request costs the model, without the HTTP),

and prints queries/s of each per round, the medians and their ratio, and whether both gave the
same products. Plus, once, `search_file` end to end on a .txt of the queries (reading it, loading
the model, searching, writing the Parquet): what a user waits for. Writes
benchmarks/results/batch_search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from components.config import SplitConfig, load_params
from components.data.clicklog import split_days
from components.serving.search import (
    QueryFile,
    load_model,
    requests_of,
    result_table,
    search_batches,
    search_file,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def pick_queries(
    artifacts: Path, split: SplitConfig, n: int, max_chars: int
) -> tuple[list[str], int]:
    """(n distinct queries, test days' first; how many are from the test days)."""
    impressions = pd.read_parquet(
        artifacts / "validate" / "impressions.parquet", columns=["day", "query"]
    )
    test = split_days(impressions, split).test

    def distinct(frame: pd.DataFrame) -> list[str]:
        texts = {q.strip() for q in frame["query"].astype(str)}
        return sorted(q for q in texts if q and len(q) <= max_chars)

    first = distinct(test)
    rest = sorted(set(distinct(impressions)) - set(first))
    picked = (first + rest)[:n]
    return picked, min(len(first), len(picked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="has params.yaml, mlruns/")
    parser.add_argument("--model", default="models:/ace@champion")
    parser.add_argument("--queries", type=int, default=2000, help="distinct queries, at most")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each")
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_search.json")
    args = parser.parse_args()
    out = args.out.resolve()
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    os.chdir(args.project)  # params' relative paths and the default tracking store are here
    params = load_params(Path("params.yaml"))
    model = load_model(params, args.model)
    inner = model.unwrap_python_model()
    limits = inner.limits
    queries, from_test = pick_queries(
        params.paths.artifacts_dir, params.split, args.queries, limits.max_query_chars
    )
    batch = QueryFile.of(queries, args.k)
    hot = sum(q in inner.retriever.cache for q in queries)
    print(
        f"model {args.model}: {len(queries)} queries ({from_test} from the test days, {hot} in "
        f"the hot-query cache), k {args.k}, requests of at most {limits.max_rows_per_request}"
    )

    def batched() -> tuple[float, list[list[str]]]:
        start = time.perf_counter()
        answers, _, _ = search_batches(model, batch)
        result_table(batch, answers)
        return time.perf_counter() - start, list(answers["product_ids"])

    def single() -> tuple[float, list[list[str]]]:
        start = time.perf_counter()
        found = [
            model.predict(pd.DataFrame({"query": [q], "k": [args.k]}))["product_ids"][0]
            for q in queries
        ]
        return time.perf_counter() - start, found

    modes = {"batch": batched, "one_at_a_time": single}
    # Warm-up: a request of each kind (first calls allocate and load lazily).
    model.predict(pd.DataFrame({"query": queries[:64], "k": [args.k] * 64}))
    for q in queries[:64]:
        model.predict(pd.DataFrame({"query": [q], "k": [args.k]}))
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    answers: dict[str, list[list[str]]] = {}
    for round_ in range(args.rounds):
        order = list(modes) if round_ % 2 == 0 else list(modes)[::-1]
        for name in order:
            took, answers[name] = modes[name]()
            seconds[name].append(took)
        shown = ", ".join(f"{n} {len(queries) / seconds[n][-1]:,.0f} q/s" for n in modes)
        print(f"  round {round_ + 1}: {shown}", flush=True)
    same = sum(
        list(a) == list(b) for a, b in zip(answers["batch"], answers["one_at_a_time"], strict=True)
    )
    per_s = {name: [len(queries) / s for s in times] for name, times in seconds.items()}
    median = {name: float(np.median(values)) for name, values in per_s.items()}
    ratio = median["batch"] / median["one_at_a_time"]
    per_round = [b / s for b, s in zip(per_s["batch"], per_s["one_at_a_time"], strict=True)]

    with tempfile.TemporaryDirectory(prefix="bench_batch_search_") as tmp:
        source = Path(tmp) / "queries.txt"
        source.write_text("\n".join(queries) + "\n", encoding="utf-8")
        summary = search_file(
            params, args.model, source, args.k, Path(tmp) / "results.parquet", progress=False
        )
    print(f"{'mode':14s} {'queries/s (median)':>18s} {'per round':>30s}")
    for name in modes:
        rounds = " ".join(f"{v:,.0f}" for v in per_s[name])
        print(f"{name:14s} {median[name]:18,.0f} {rounds:>30s}")
    print(
        f"batch / one at a time: {ratio:.1f}x (per round "
        f"{', '.join(f'{r:.1f}' for r in per_round)}); same products for {same} of "
        f"{len(queries)} queries"
    )
    print(f"search_file end to end: {summary.line()}")
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1m_at_start": load_at_start,
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "model": args.model,
        "project": str(Path.cwd()),
        "queries": len(queries),
        "from_test_days": from_test,
        "hot_cached": hot,
        "k": args.k,
        "max_rows_per_request": limits.max_rows_per_request,
        "requests_per_batch_run": len(requests_of(batch, limits.max_rows_per_request)),
        "seconds": seconds,
        "queries_per_s": per_s,
        "median_queries_per_s": median,
        "ratio_batch_over_one_at_a_time": ratio,
        "ratio_per_round": per_round,
        "same_products": same,
        "search_file_end_to_end": {
            "seconds": summary.seconds,
            "search_seconds": summary.search_seconds,
            "queries_per_s_searching": summary.queries_per_second,
            "requests": summary.requests,
            "cached": summary.cached,
            "rows": summary.rows,
        },
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "total_seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({result['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
