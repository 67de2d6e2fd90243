"""Serving latency and throughput: the champion behind `ace serve`, on localhost.

    python benchmarks/bench_serving.py --project /tmp/fresh   # a project with a champion

Starts `ace serve --model models:/ace@champion` (or, with `--server mlflow`, `mlflow models serve
-m ... --env-manager local`) on a free loopback port (or benchmarks `--url`, a server already
running), waits for /ping, warms up, then sends searches back to back from `--concurrency`
threads, one query per request with `--k`: hot queries (the champion's hot-query cache: no
encoder) and tail queries (test-day queries not in the cache: the student encodes them). Plus a
cell of `--batch` tail queries per request at concurrency 1, and a mixed cell at the highest
concurrency where every other request is hostile (a `k` of the wrong type, no content type, an
empty body, broken JSON, a lone surrogate, 10,000 queries in one request, a body over the size
limit, ...): it counts the answers by status and must see no 5xx. Every cell stops after
`--requests` requests or `--max-seconds`, whichever comes first. Prints p50 / p90 / p99 latency,
requests and queries per second per cell; writes benchmarks/results/serving.json. The server
always stops (its whole process group).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from components.config import SplitConfig, load_params
from components.data.clicklog import split_days
from components.retrieval.index import HOT_FILE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_version(model_uri: str) -> dict:
    """Registry facts of `models:/name@alias` or `models:/name/version` (empty otherwise)."""
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/"):
        return {}
    name, _, ref = model_uri.removeprefix("models:/").partition("/")
    client = MlflowClient()
    if "@" in name:
        name, alias = name.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        version = client.get_model_version(name, ref)
    return {
        "name": name,
        "version": str(version.version),
        "aliases": list(version.aliases),
        "run_id": version.run_id,
        "tags": dict(version.tags),
    }


def hot_queries(model_uri: str, artifacts: Path) -> tuple[list[str], str]:
    """The cached queries of the bundle being served (else the project's index), and where from."""
    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri}/artifacts/index/{HOT_FILE}"
        )
        source = f"{model_uri}/artifacts/index/{HOT_FILE}"
    except Exception:  # no registry or another bundle layout: the index stage's own file
        path = artifacts / "index" / HOT_FILE
        source = str(path)
    return json.loads(Path(path).read_text(encoding="utf-8")), source


def tail_queries(artifacts: Path, split: SplitConfig, hot: set[str], max_chars: int) -> list[str]:
    """Distinct test-day queries the cache does not hold (the student encodes these)."""
    impressions = pd.read_parquet(
        artifacts / "validate" / "impressions.parquet", columns=["day", "query"]
    )
    test = split_days(impressions, split).test
    queries = {q.strip() for q in test["query"].astype(str)}
    return sorted(q for q in queries if q and q not in hot and len(q) <= max_chars)


def start_server(
    kind: str, model_uri: str, port: int, workers: int | None, project: Path, log: Path
) -> subprocess.Popen:
    """`ace serve` or `mlflow models serve` in its own process group (uvicorn and its workers
    are children), on loopback."""
    bin_dir = Path(sys.executable).parent
    if kind == "ace":
        command = [str(bin_dir / "ace"), "serve", "--model", model_uri]
    else:
        command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri]
        command += ["--env-manager", "local"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    if workers:
        command += ["--workers", str(workers)]
    # mlflow starts uvicorn by name: the venv must be on PATH.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(
        command,
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        start_new_session=True,
    )


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_ready(
    url: str, server: subprocess.Popen | None, log: Path | None, timeout: float
) -> float:
    """Seconds until /ping answers 200; raises if the server dies or the time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        for route in ("/ping", "/health"):
            try:
                with urllib.request.urlopen(url + route, timeout=2) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except (OSError, urllib.error.URLError):
                pass
        if server is not None and server.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"the server exited with {server.returncode}:\n{tail}")
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer /ping within {timeout:.0f} s")


class Client:
    """One keep-alive HTTP connection to /invocations."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = (parts.path.rstrip("/") or "") + "/invocations"
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, content_type: str | None) -> tuple[int, float, bytes]:
        """(status, seconds, response body); status 0 when the connection failed."""
        headers = {"Content-Type": content_type} if content_type else {}
        start = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            self.conn.request("POST", self.path, body=body, headers=headers)
            response = self.conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as err:
            self.close()
            return 0, time.perf_counter() - start, f"{type(err).__name__}: {err}".encode()
        return response.status, time.perf_counter() - start, payload

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


Request = tuple[str, bytes, str | None]  # (kind, body, content type)


def search_body(queries: list[str], k: int) -> bytes:
    return json.dumps({"dataframe_records": [{"query": q, "k": k} for q in queries]}).encode()


def hostile_requests(max_request_bytes: int) -> list[Request]:
    """(name, body, content type) of requests a client may send that must end in a 4xx."""
    json_type = "application/json"
    many = search_body(["red dress"] * 10_000, 10)
    oversize = search_body(["red dress"] * (max_request_bytes // 30 + 1), 10)
    return [
        (
            "k as a string",
            json.dumps({"dataframe_records": [{"query": "red", "k": "10"}]}).encode(),
            json_type,
        ),
        (
            "k as a fraction",
            json.dumps({"dataframe_records": [{"query": "red", "k": 10.5}]}).encode(),
            json_type,
        ),
        (
            "k as a bool",
            json.dumps({"dataframe_records": [{"query": "red", "k": True}]}).encode(),
            json_type,
        ),
        ("k of 0", search_body(["red"], 0), json_type),
        ("empty query", search_body([""], 10), json_type),
        ("lone surrogate", b'{"dataframe_records": [{"query": "\\ud800"}]}', json_type),
        ("broken JSON", b'{"dataframe_records": [', json_type),
        ("wrong shape", b'{"something": "else"}', json_type),
        ("empty body, no content type", b"", None),
        ("empty body", b"", json_type),
        ("text/plain", b"red dress", "text/plain"),
        ("10,000 queries", many, json_type),
        ("body over the size limit", oversize, json_type),
    ]


def run_cell(
    url: str,
    requests_for: list[Request],
    batch: int,
    concurrency: int,
    requests: int,
    max_seconds: float,
) -> dict:
    """`concurrency` threads sending `requests_for` (in order, cycling) back to back until
    `requests` or `max_seconds`. Latency percentiles are over the 200 answers; every answer is
    counted by status, and by kind for the rest."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    statuses: list[int] = []
    cached: list[bool] = []
    refused: dict[str, dict[str, list[float]]] = {}
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + max_seconds

    def worker() -> None:
        nonlocal issued
        client = Client(url)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if issued >= requests:
                        return
                    kind, body, content_type = requests_for[issued % len(requests_for)]
                    issued += 1
                status, seconds, payload = client.post(body, content_type)
                with lock:
                    statuses.append(status)
                    if status == 200:
                        latencies.append(seconds)
                        rows = json.loads(payload)["predictions"]
                        cached.extend(bool(r["cached"]) for r in rows)
                        continue
                    refused.setdefault(kind, {}).setdefault(str(status), []).append(seconds)
                    if (status == 0 or status >= 500) and len(errors) < 5:
                        errors.append(f"{kind}: {status}: {payload[:300].decode(errors='replace')}")
        finally:
            client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ok = len(latencies)
    ms = 1000 * np.array(latencies) if ok else np.array([np.nan])
    by_status = {str(code): statuses.count(code) for code in sorted(set(statuses))}
    return {
        "batch": batch,
        "concurrency": concurrency,
        "requests": len(statuses),
        "ok": ok,
        "by_status": by_status,
        "server_errors": sum(n for code, n in by_status.items() if not 0 < int(code) < 500),
        "refused": {
            kind: {
                code: {"n": len(t), "p50_ms": 1000 * float(np.median(t))}
                for code, t in codes.items()
            }
            for kind, codes in refused.items()
        },
        "error_samples": errors,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "requests_per_s": ok / wall,
        "queries_per_s": ok * batch / wall,
        "wall_s": wall,
        "stopped_by": "time" if len(statuses) < requests else "count",
        "cached_share": float(np.mean(cached)) if cached else None,
    }


def searches(queries: list[str], batch: int, k: int, seed: int) -> list[Request]:
    """Search requests of `batch` queries each, the queries in a seeded order."""
    order = np.random.default_rng(seed).permutation(len(queries))
    picked = [queries[i] for i in order]
    chunks = [picked[i : i + batch] for i in range(0, len(picked) - batch + 1, batch)] or [picked]
    return [("search", search_body(chunk, k), "application/json") for chunk in chunks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="has mlruns/ and artifacts/")
    parser.add_argument("--model", default="models:/ace@champion")
    parser.add_argument("--server", choices=("ace", "mlflow"), default="ace", help="what to start")
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--workers", type=int, help="uvicorn workers (mlflow's default: 1)")
    parser.add_argument("--requests", type=int, default=400, help="at most, per cell")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="at most, per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32, help="queries per request, extra cell")
    parser.add_argument("--warmup", type=int, default=40, help="requests before measuring")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = parser.parse_args()
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    project = args.project.resolve()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    params = load_params(project / "params.yaml")
    artifacts = project / params.paths.artifacts_dir
    version = served_version(args.model)
    hot, hot_source = hot_queries(args.model, artifacts)
    limits = params.serving.limits
    tail = tail_queries(artifacts, params.split, set(hot), limits.max_query_chars)
    print(
        f"model {args.model} (version {version.get('version', '?')}): "
        f"{len(hot)} hot queries, {len(tail)} tail queries"
    )

    server = None
    log = Path(tempfile.mkstemp(prefix="bench_serving_", suffix=".log")[1])
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            port = args.port or free_port()
            url = f"http://127.0.0.1:{port}"
            server = start_server(args.server, args.model, port, args.workers, project, log)
        startup = wait_ready(url, server, log, args.startup_timeout)
        print(f"server ready at {url} after {startup:.1f} s")
        top = max(args.concurrency)
        for queries in (hot, tail):  # at full concurrency: every server worker warms up
            run_cell(url, searches(queries, 1, args.k, 1), 1, top, args.warmup, 60.0)
        plan = [(kind, 1, c) for c in args.concurrency for kind in ("hot", "tail")]
        if args.batch > 1:
            plan += [("tail", args.batch, 1)]
        cells = []
        for n, (kind, batch, concurrency) in enumerate(plan):
            requests = searches(hot if kind == "hot" else tail, batch, args.k, n + 2)
            cell = run_cell(url, requests, batch, concurrency, args.requests, args.max_seconds)
            cells.append({"queries": kind, **cell})
            print(
                f"  {kind} batch {batch} x{concurrency}: {cell['requests']} requests, "
                f"p50 {cell['p50_ms']:.1f} ms, {cell['requests_per_s']:.1f} req/s",
                flush=True,
            )
        # Every other request hostile: each must be a 4xx, and the valid ones still answered.
        valid = searches(hot + tail, 1, args.k, len(plan) + 2)
        hostile = hostile_requests(limits.max_request_bytes) * len(valid)
        mixed = [r for pair in zip(valid, hostile, strict=False) for r in pair]
        cell = run_cell(url, mixed, 1, top, args.requests, args.max_seconds)
        cells.append({"queries": "mixed", **cell})
        print(
            f"  mixed x{top}: {cell['requests']} requests, by status {cell['by_status']}, "
            f"{cell['server_errors']} 5xx or failed",
            flush=True,
        )
        server_log = log.read_text(encoding="utf-8", errors="replace")
    finally:
        if server is not None:
            stop_server(server)
        log.unlink(missing_ok=True)

    header = (
        f"{'queries':8s} {'batch':>5s} {'conc':>4s} {'reqs':>5s} {'4xx':>4s} {'5xx':>4s} "
        f"{'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'req/s':>7s} {'q/s':>7s} {'wall s':>6s} "
        f"{'cached':>6s}"
    )
    print(header)
    for c in cells:
        share = "-" if c["cached_share"] is None else f"{c['cached_share']:.2f}"
        print(
            f"{c['queries']:8s} {c['batch']:5d} {c['concurrency']:4d} {c['requests']:5d} "
            f"{c['requests'] - c['ok'] - c['server_errors']:4d} {c['server_errors']:4d} "
            f"{c['p50_ms']:8.1f} {c['p90_ms']:8.1f} {c['p99_ms']:8.1f} "
            f"{c['requests_per_s']:7.1f} {c['queries_per_s']:7.1f} {c['wall_s']:6.1f} {share:>6s}"
        )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m_at_start": load_at_start,
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "model": args.model,
        "served_version": version,
        "server": {
            "url": args.url or "started by this script",
            "kind": None if args.url else args.server,
            "limits": limits.model_dump(),
            "workers": args.workers,
            "workers_note": "None: mlflow's default, 1 uvicorn worker (MLFLOW_MODELS_WORKERS)",
            "startup_s": startup,
            "log_errors": [line for line in server_log.splitlines() if "Error" in line][:5],
        },
        "queries": {"hot": len(hot), "hot_source": hot_source, "tail": len(tail)},
        "params": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
        "cells": cells,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({result['total_seconds']:.0f} s in all)")
    mixed = cells[-1]
    print("refused in the mixed cell (kind: status x count, p50 ms):")
    for kind, codes in mixed["refused"].items():
        shown = ", ".join(f"{code} x{v['n']} {v['p50_ms']:.1f}" for code, v in codes.items())
        print(f"  {kind}: {shown}")
    failed = sum(c["server_errors"] for c in cells)
    print(f"5xx or failed connections over every cell: {failed}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
