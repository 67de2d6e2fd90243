"""The served retriever: one MLflow pyfunc bundling everything a search needs.

Bundled artifacts: the distilled query tower and its tokenizer, the FAISS product index with its
product ids, and the hot-query cache (the teacher's embeddings of the most frequent queries). A
query found in the cache skips the encoder; any other goes through the student. The fine-tuned
product tower rides along (never loaded to serve) so drift monitoring can embed new products
under the same towers.

Input: a DataFrame (JSON `{"inputs": [...]}` or `{"dataframe_records": [...]}` over HTTP) with a
`query` column and an optional `k` column (default `DEFAULT_K`, at most `MAX_K`). Output: one row
per query with `product_ids` and `scores` (best first) and `cached`. A request that breaks these
rules gets an MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers
with HTTP 400 and the message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

DEFAULT_K = 10
MAX_K = 1000
MAX_QUERY_CHARS = 256

STUDENT_ARTIFACT = "student"
PRODUCT_TOWER_ARTIFACT = "product_tower"  # the teacher: embeds products the index lacks (monitor)
INDEX_ARTIFACT = "index"
SETTINGS_ARTIFACT = "settings"
SETTINGS_FILE = "settings.json"


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def validate_request(frame: Any, max_k: int) -> tuple[list[str], list[int]]:
    """(queries, ks) from a request frame, or an INVALID_PARAMETER_VALUE error naming the row."""
    if isinstance(frame, dict):
        frame = pd.DataFrame(frame)
    if not isinstance(frame, pd.DataFrame):
        raise _invalid(f"expected rows with a 'query' field, got {type(frame).__name__}")
    if "query" not in frame.columns:
        raise _invalid("missing field 'query'")
    if frame.empty:
        raise _invalid("no queries in the request")
    queries, ks = [], []
    for row, (query, k) in enumerate(
        zip(frame["query"], frame["k"] if "k" in frame else [None] * len(frame), strict=True)
    ):
        if not isinstance(query, str):
            raise _invalid(f"row {row}: 'query' must be a string, got {type(query).__name__}")
        if not query.strip():
            raise _invalid(f"row {row}: 'query' is empty")
        if len(query) > MAX_QUERY_CHARS:
            raise _invalid(
                f"row {row}: 'query' has {len(query)} characters, at most {MAX_QUERY_CHARS}"
            )
        if k is None or (isinstance(k, float) and np.isnan(k)):
            k = DEFAULT_K
        if isinstance(k, bool) or not isinstance(k, (int, np.integer, float, np.floating)):
            raise _invalid(f"row {row}: 'k' must be an integer, got {type(k).__name__}")
        if float(k) != int(k):
            raise _invalid(f"row {row}: 'k' must be an integer, got {k}")
        if not 1 <= int(k) <= max_k:
            raise _invalid(f"row {row}: 'k' must be between 1 and {max_k}, got {int(k)}")
        queries.append(query.strip())
        ks.append(int(k))
    return queries, ks


class Retriever:
    """Search over the bundled index: used by the pyfunc and by `ace search` alike."""

    def __init__(self, student_dir: Path, index_dir: Path, max_query_len: int) -> None:
        import torch

        from components.index import PRODUCT_VECTORS, load
        from components.retrieval import load_retriever

        self.model, self.tokenizer = load_retriever(student_dir)
        self.model.to(torch.device("cpu"))
        self.index, self.product_ids, self.manifest, hot, hot_emb = load(index_dir)
        self.product_vectors = np.load(Path(index_dir) / PRODUCT_VECTORS)
        self.cache = {q: hot_emb[i] for i, q in enumerate(hot)}
        self.max_query_len = max_query_len
        self.max_k = min(MAX_K, len(self.product_ids))

    def embed(self, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, cached?) per query: cached ones from the hot-query cache."""
        from components.retrieval import embed_queries

        cached = np.array([q in self.cache for q in queries], bool)
        dim = self.index.d
        out = np.zeros((len(queries), dim), np.float32)
        for i in np.flatnonzero(cached):
            out[i] = self.cache[queries[i]]
        tail = np.flatnonzero(~cached)
        if len(tail):
            import torch

            texts = [queries[i] for i in tail]
            out[tail] = embed_queries(
                self.model, self.tokenizer, texts, self.max_query_len, 64, torch.device("cpu")
            )
        return out, cached

    def score_pairs(self, queries: list[str], product_ids: list[str]) -> np.ndarray:
        """Cosine of each (query, product) pair, as the search ranks them (for GAUC)."""
        row = {pid: i for i, pid in enumerate(self.product_ids)}
        missing = sorted({pid for pid in product_ids if pid not in row})
        if missing:
            raise _invalid(f"{len(missing)} products are not in the index (e.g. {missing[0]})")
        distinct = sorted(set(queries))
        embeddings, _ = self.embed(distinct)
        position = {q: i for i, q in enumerate(distinct)}
        products = self.product_vectors[[row[pid] for pid in product_ids]]
        return (embeddings[[position[q] for q in queries]] * products).sum(1)

    def search(self, queries: list[str], ks: list[int]) -> pd.DataFrame:
        embeddings, cached = self.embed(queries)
        depth = max(ks)
        scores, rows = self.index.search(np.ascontiguousarray(embeddings), depth)
        records = []
        for i, (query, k) in enumerate(zip(queries, ks, strict=True)):
            keep = rows[i][:k] >= 0  # FAISS pads with -1 when it finds fewer
            records.append(
                {
                    "query": query,
                    "product_ids": [self.product_ids[r] for r in rows[i][:k][keep]],
                    "scores": [float(s) for s in scores[i][:k][keep]],
                    "cached": bool(cached[i]),
                }
            )
        return pd.DataFrame.from_records(records)


class AceRetrieverModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of `Retriever` (see the module doc for the request format)."""

    # Requests are validated by `validate_request` against SIGNATURE, not by type hints (MLflow
    # would otherwise warn on every import that predict has none).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.artifacts: dict[str, str] = dict(context.artifacts)
        settings_file = Path(context.artifacts[SETTINGS_ARTIFACT]) / SETTINGS_FILE
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        self.retriever = Retriever(
            Path(context.artifacts[STUDENT_ARTIFACT]),
            Path(context.artifacts[INDEX_ARTIFACT]),
            int(settings["max_query_len"]),
        )

    # Unannotated on purpose: MLflow reads predict's type hints as a signature of their own.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        queries, ks = validate_request(model_input, self.retriever.max_k)
        return self.retriever.search(queries, ks)


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "query"), ColSpec("long", "k", required=False)])
)


def log_retriever(
    student_dir: Path,
    index_dir: Path,
    max_query_len: int,
    work_dir: Path,
    product_tower_dir: Path | None = None,
    name: str = "retriever",
) -> Any:
    """Log the bundle as an MLflow pyfunc model in the active run; returns the ModelInfo."""
    settings_dir = Path(work_dir) / "serving-settings"
    settings_dir.mkdir(parents=True, exist_ok=True)
    (settings_dir / SETTINGS_FILE).write_text(json.dumps({"max_query_len": max_query_len}))
    example = pd.DataFrame({"query": ["red striped dress"], "k": [10]})
    components_dir = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=AceRetrieverModel(),
        artifacts={
            STUDENT_ARTIFACT: str(student_dir),
            INDEX_ARTIFACT: str(index_dir),
            SETTINGS_ARTIFACT: str(settings_dir),
            **({PRODUCT_TOWER_ARTIFACT: str(product_tower_dir)} if product_tower_dir else {}),
        },
        code_paths=[str(components_dir)],
        signature=SIGNATURE,
        input_example=example,
    )
