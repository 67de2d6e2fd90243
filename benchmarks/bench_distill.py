"""Query encoding latency: the distilled student against its teacher, in the same run.

    python benchmarks/bench_distill.py          # after `dvc repro` (finetune + distill)

Encodes the test days' queries at batch 1 and batch 64 with the teacher (artifacts/finetune)
and the student (artifacts/distill), alternating blocks so machine load hits both alike, and
prints median latency per call and the speed-up (the paper: more than 2x). Also prints the
stage's Recall@100 of each. Writes benchmarks/results/distill.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.config import load_params
from components.data.clicklog import split_days
from components.retrieval.retrieval import encode_texts, load_retriever, trim

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=20, help="calls per block")
    args = parser.parse_args()
    os.chdir(ROOT)
    params = load_params(ROOT / "params.yaml")
    artifacts = params.paths.artifacts_dir
    teacher, tokenizer = load_retriever(artifacts / "finetune" / "model")
    student, _ = load_retriever(artifacts / "distill" / "student")
    impressions = pd.read_parquet(artifacts / "validate" / "impressions.parquet")
    test = split_days(impressions, params.split).test
    queries = sorted(test["query"].unique())
    ids = encode_texts(tokenizer, queries, params.finetune.max_query_len)
    rng = np.random.default_rng(0)

    def call(model: torch.nn.Module, batch: int) -> float:
        rows = rng.choice(len(ids), batch, replace=batch > len(ids))
        input_ids, mask = trim(ids[rows], tokenizer.pad_token_id)
        start = time.perf_counter()
        with torch.no_grad():
            model.encode_queries(input_ids, mask)
        return time.perf_counter() - start

    results = {}
    for batch in (1, 64):
        times: dict[str, list[float]] = {"teacher": [], "student": []}
        models = {"teacher": teacher, "student": student}
        for model in models.values():  # warm-up
            for _ in range(3):
                call(model, batch)
        for r in range(args.rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                times[name] += [call(models[name], batch) for _ in range(args.calls)]
        median = {name: float(np.median(t)) for name, t in times.items()}
        results[f"batch_{batch}"] = {
            "teacher_ms": 1000 * median["teacher"],
            "student_ms": 1000 * median["student"],
            "speedup": median["teacher"] / median["student"],
        }
    summary_file = artifacts / "distill" / "student" / "distill_summary.json"
    stage = json.loads(summary_file.read_text())["metrics"] if summary_file.exists() else {}
    result = {
        "layers": {
            "teacher": teacher.config.num_hidden_layers,
            "student": student.config.num_hidden_layers,
        },
        "latency": results,
        "recall_at_100": {
            "teacher": stage.get("teacher_recall_at_100"),
            "student": stage.get("student_recall_at_100"),
            "student_over_teacher": stage.get("student_over_teacher_recall_at_100"),
        },
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }
    print(f"{'':10s} {'teacher ms':>11s} {'student ms':>11s} {'speed-up':>9s}")
    for name, row in results.items():
        print(
            f"{name:10s} {row['teacher_ms']:11.2f} {row['student_ms']:11.2f} {row['speedup']:8.2f}x"
        )
    recall = result["recall_at_100"]
    if recall["student"] is not None:
        print(
            f"Recall@100 teacher {recall['teacher']:.4f}, student {recall['student']:.4f} "
            f"({100 * recall['student_over_teacher']:.1f}% of the teacher's)"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
