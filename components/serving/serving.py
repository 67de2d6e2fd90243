"""The served retriever: one MLflow pyfunc bundling everything a search needs.

Bundled artifacts: the distilled query tower and its tokenizer, the FAISS product index with its
product ids, the hot-query cache (the teacher's embeddings of the most frequent queries), and the
limits (params `serving`). A query found in the cache skips the encoder; any other goes through
the student. The fine-tuned product tower rides along (never loaded to serve) so drift
monitoring can embed new products under the same towers.

The model is logged as MLflow "models from code" (components/serving/served_model.py): MLflow runs
that file to build it, so the bundle holds code and files, no pickled Python object.

Input: a DataFrame (JSON `{"dataframe_records": [...]}` or `{"inputs": ...}` over HTTP, or
Parquet) with a `query` column and an optional `k` column (per row: a missing or null `k` is
`DEFAULT_K`); other fields are dropped by MLflow. Both reach `validate_request` as sent (their
signature type is "any", so MLflow casts nothing; it cannot read CSV against such a signature):
`k` is a whole number from 1 to min(max_k, catalogue size), and a string, a bool or a fraction is
refused. Output: one row per query with `product_ids` and `scores` (best first), `cached`, and
`warning`: for a query none of whose words the model knows (emoji, another script) nothing is
returned and the warning says why, instead of products picked by an embedding of nothing. A
request that breaks these rules gets an MlflowException with INVALID_PARAMETER_VALUE (HTTP 400)
and a one-line message naming the row and field, or the limit; an unexpected failure is logged
and answered without its stack trace.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

from components.atomic import readable_dir
from components.config import ServingLimits

DEFAULT_K = 10
FIELDS = ("query", "k")
UNKNOWN_WORDS = "no word of this query is known to the model: nothing to match it against"

STUDENT_ARTIFACT = "student"
PRODUCT_TOWER_ARTIFACT = "product_tower"  # the teacher: embeds products the index lacks (monitor)
INDEX_ARTIFACT = "index"
SETTINGS_ARTIFACT = "settings"
SETTINGS_FILE = "settings.json"
MODEL_CODE = Path(__file__).with_name("served_model.py")

_logger = logging.getLogger(__name__)


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _k(value: Any, row: int, max_k: int) -> int:
    """A row's k as sent: missing -> DEFAULT_K; a whole number in 1..max_k; nothing else."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return DEFAULT_K  # absent from this row (pandas fills a partly given column with NaN)
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer | float):
        raise _invalid(f"row {row}: 'k' must be a whole number, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise _invalid(f"row {row}: 'k' must be a whole number, got {value}")
    if not 1 <= value <= max_k:
        raise _invalid(f"row {row}: 'k' must be between 1 and {max_k}, got {int(value)}")
    return int(value)


def _query(value: Any, row: int, max_chars: int) -> str:
    if not isinstance(value, str):
        raise _invalid(f"row {row}: 'query' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _invalid(f"row {row}: 'query' is empty")
    if len(value) > max_chars:
        raise _invalid(f"row {row}: 'query' has {len(value)} characters, at most {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): not text
        raise _invalid(f"row {row}: 'query' is not valid Unicode text") from None
    return value.strip()


def validate_request(
    frame: Any, limits: ServingLimits, catalogue_size: int
) -> tuple[list[str], list[int]]:
    """(queries, ks) from a request frame, or an INVALID_PARAMETER_VALUE error naming the row,
    the field or the limit (see the module doc)."""
    if isinstance(frame, dict) or (
        isinstance(frame, list) and all(isinstance(row, dict) for row in frame)
    ):
        try:
            frame = pd.DataFrame(frame)
        except ValueError as err:
            raise _invalid(f"expected rows with a 'query' field ({err})") from None
    if not isinstance(frame, pd.DataFrame):
        raise _invalid(f"expected rows with a 'query' field, got {type(frame).__name__}")
    if "query" not in frame.columns:
        # MLflow drops unknown fields: rows of only those arrive as no rows at all.
        raise _invalid("missing field 'query'" if len(frame.index) else "no rows with a 'query'")
    if len(frame.index) == 0:
        raise _invalid("no queries in the request")
    if len(frame) > limits.max_rows_per_request:
        raise _invalid(
            f"{len(frame)} queries in one request, at most {limits.max_rows_per_request} "
            "(serving.limits.max_rows_per_request): split it"
        )
    max_k = min(limits.max_k, catalogue_size)
    ks = frame["k"] if "k" in frame else [None] * len(frame)
    rows = enumerate(zip(frame["query"], ks, strict=True))
    checked = [(_query(q, row, limits.max_query_chars), _k(k, row, max_k)) for row, (q, k) in rows]
    return [q for q, _ in checked], [k for _, k in checked]


class Retriever:
    """Search over the bundled index: used by the pyfunc and by `ace search` alike."""

    def __init__(self, student_dir: Path, index_dir: Path, max_query_len: int) -> None:
        import torch

        from components.retrieval.index import PRODUCT_VECTORS, load
        from components.retrieval.retrieval import load_retriever

        self.model, self.tokenizer = load_retriever(student_dir)
        self.model.to(torch.device("cpu"))
        self.index, self.product_ids, self.manifest, hot, hot_emb = load(index_dir)
        self.product_vectors = np.load(readable_dir(index_dir) / PRODUCT_VECTORS)
        self.cache = {q: hot_emb[i] for i, q in enumerate(hot)}
        self.max_query_len = max_query_len

    def embed(self, queries: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, cached?) per query: cached ones from the hot-query cache."""
        from components.retrieval.retrieval import embed_queries

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

    def knows_a_word(self, queries: list[str]) -> np.ndarray:
        """Per query: whether any of its word pieces is in the vocabulary (not all [UNK])."""
        unknown = self.tokenizer.unk_token_id
        pieces = self.tokenizer(queries, add_special_tokens=False)["input_ids"]
        return np.array([any(piece != unknown for piece in ids) for ids in pieces], bool)

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
        """Top-k per query; none, with a warning, for a query of only unknown words."""
        embeddings, cached = self.embed(queries)
        matchable = cached | self.knows_a_word(queries)
        scores, rows = self.index.search(np.ascontiguousarray(embeddings), max(ks))
        records = []
        for i, (query, k) in enumerate(zip(queries, ks, strict=True)):
            keep = (rows[i][:k] >= 0) & matchable[i]  # FAISS pads with -1 when it finds fewer
            records.append(
                {
                    "query": query,
                    "product_ids": [self.product_ids[r] for r in rows[i][:k][keep]],
                    "scores": [float(s) for s in scores[i][:k][keep]],
                    "cached": bool(cached[i]),
                    "warning": None if matchable[i] else UNKNOWN_WORDS,
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
        # Bundles from before the limits were params hold none: they get the defaults.
        self.limits = ServingLimits.model_validate(settings.get("limits", {}))
        self.retriever = Retriever(
            Path(context.artifacts[STUDENT_ARTIFACT]),
            Path(context.artifacts[INDEX_ARTIFACT]),
            int(settings["max_query_len"]),
        )

    # Unannotated on purpose: MLflow reads predict's type hints as a signature of their own.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        queries, ks = validate_request(model_input, self.limits, len(self.retriever.product_ids))
        try:
            return self.retriever.search(queries, ks)
        except Exception:
            # MLflow would put the stack trace in the response body: it goes to the log only.
            _logger.exception("search failed for %d queries", len(queries))
            raise MlflowException(
                "the search failed unexpectedly; the server log has the details",
                error_code=INTERNAL_ERROR,
            ) from None


# Both fields "any" and optional, so MLflow casts and checks nothing and `validate_request` sees
# each request as sent: MLflow would cast "10", 10.5 or true to a k of 10, and answer a missing
# query with a message that prints the whole request.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType(), field, required=False) for field in FIELDS])
)


def log_retriever(
    student_dir: Path,
    index_dir: Path,
    max_query_len: int,
    work_dir: Path,
    limits: ServingLimits,
    product_tower_dir: Path | None = None,
    name: str = "retriever",
) -> Any:
    """Log the bundle as an MLflow pyfunc model (from code) in the active run; its ModelInfo."""
    settings_dir = Path(work_dir) / "serving-settings"
    settings_dir.mkdir(parents=True, exist_ok=True)
    settings = {"max_query_len": max_query_len, "limits": limits.model_dump()}
    (settings_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    example = pd.DataFrame({"query": ["red striped dress"], "k": [10]})
    components_dir = (
        Path(__file__).resolve().parents[1]
    )  # the whole package, as served_model imports it
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={
            STUDENT_ARTIFACT: str(student_dir),
            INDEX_ARTIFACT: str(readable_dir(index_dir)),
            SETTINGS_ARTIFACT: str(settings_dir),
            **({PRODUCT_TOWER_ARTIFACT: str(product_tower_dir)} if product_tower_dir else {}),
        },
        code_paths=[str(components_dir)],
        signature=SIGNATURE,
        input_example=example,
    )
