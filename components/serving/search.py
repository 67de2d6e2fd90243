"""`ace search`: the champion's top-K for one query, with titles and an optional image sheet;
or for every query of a file, in batches, to a Parquet table (`search_file`).

Batch search (`ace search --file queries.txt|csv|parquet --out results.parquet`) goes through the
same served bundle as one query does: the file's queries are sent to the model's `predict` in
requests of at most the bundle's `serving.limits.max_rows_per_request` rows. Every request is
checked by the model's own `validate_request` before the first is searched, so a bad line fails
the whole file at once, naming the file and the line (or row), and nothing is written.

Input:
- `.txt`: one query per line, UTF-8. Blank lines are skipped; lines keep the file's numbering
  (line 1 is the first), so `query_row` and errors point at the line an editor shows.
- `.csv`: UTF-8 with a header; a `query` column and an optional `k` column (a blank cell: `--k`),
  other columns ignored; blank lines are skipped. Rows are named by their line in the file (the
  header is line 1, so without blank lines or quoted line breaks data row i is line i + 2).
- `.parquet`: a `query` column and an optional `k` column (null: `--k`); rows are named by their
  0-based position (as pandas shows them, and as the served model names request rows).

Output (Parquet, long: one row per query and rank; `RESULT_SCHEMA`): `query_row` (the line or
row above), `query` (as the model searched it: stripped), `rank` (1-based), `product_id`,
`score` (cosine), `cached` (answered from the hot-query cache) and `warning` (null unless the
model returned one). A query with no products (its words all unknown to the model: the warning
says so) has one row with null rank, product and score, so every query of the file appears.
The file is written beside its destination and moved into place (`publish_file`): a failed run
leaves no partial file and an earlier result whole.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.atomic import publish_file
from components.config import Params
from components.data.clicklog import validated_table
from components.errors import AceError, DataError
from components.ops.plots import figure

FORMATS = (".txt", ".csv", ".parquet")
RESULT_SCHEMA = pa.schema(
    [
        ("query_row", pa.int64()),
        ("query", pa.string()),
        ("rank", pa.int32()),
        ("product_id", pa.string()),
        ("score", pa.float32()),
        ("cached", pa.bool_()),
        ("warning", pa.string()),
    ]
)


def load_model(params: Params, model_uri: str) -> Any:
    """The registered (or local) pyfunc model, or an AceError naming the URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.ops import tracking

    tracking.use_experiment(params.tracking.experiment)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        message = str(getattr(err, "message", err)).strip().splitlines()
        reason = message[0] if message else type(err).__name__
        raise AceError(f"{model_uri}: no such model ({reason}); run the pipeline") from err


def search_titles(
    params: Params, model_uri: str, query: str, k: int
) -> tuple[pd.DataFrame, str | None]:
    """(rows of product_id, score, title, image_path, cached, best first; the model's warning:
    for a query of only unknown words there are no rows, and the warning says why)."""
    from mlflow.exceptions import MlflowException

    model = load_model(params, model_uri)
    try:
        found = model.predict(pd.DataFrame({"query": [query], "k": [k]}))
    except MlflowException as err:
        raise AceError(err.message) from err
    products = validated_table(params.paths.artifacts_dir, "products")
    products = products.set_index("product_id")
    ids, scores = found["product_ids"][0], found["scores"][0]
    results = pd.DataFrame(
        {
            "product_id": ids,
            "score": scores,
            "title": [products.at[i, "title"] if i in products.index else "?" for i in ids],
            "image_path": [
                products.at[i, "image_path"] if i in products.index else None for i in ids
            ],
            "cached": bool(found["cached"][0]),
        }
    )
    return results, found["warning"][0]


def contact_sheet(params: Params, results: pd.DataFrame, query: str, path: Path) -> None:
    import cv2

    n = max(1, len(results))
    cols = min(5, n)
    rows = -(-n // cols)
    with figure(path, rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False) as (fig, axes):
        for ax in axes.ravel():
            ax.axis("off")
        for ax, row in zip(axes.ravel(), results.itertuples(), strict=False):
            image = cv2.imread(str(params.paths.data_dir / str(row.image_path)))
            if image is not None:
                ax.imshow(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
            ax.set_title(f"{row.score:.2f} {str(row.title)[:28]}", fontsize=6)
        fig.suptitle(f"ace search: {query!r}", fontsize=9)
        fig.tight_layout()


# --- batch search -------------------------------------------------------------------------------


@dataclass
class QueryFile:
    """The queries of a file, with where each is in it and its k (its own, else the default)."""

    path: Path
    unit: str  # "line" (.txt, .csv) or "row" (.parquet)
    places: list[int]  # the line number (1-based) or row position (0-based) of each query
    queries: list[Any]  # as read: checked by the model's own rules before any search
    ks: list[int]
    own_k: list[bool]  # whether the k came from the file (else from --k)

    def where(self, i: int) -> str:
        return f"{self.path}: {self.unit} {self.places[i]}"

    @classmethod
    def of(cls, queries: list[str], k: int, name: str = "<queries>") -> QueryFile:
        """Queries from a list (benchmarks, tests): row i is the i-th."""
        n = len(queries)
        return cls(Path(name), "row", list(range(n)), list(queries), [k] * n, [False] * n)


@dataclass
class BatchSummary:
    source: Path
    out: Path
    queries: int
    cached: int  # answered from the hot-query cache
    warnings: int  # with a warning (and no products)
    rows: int  # rows written
    requests: int  # predict calls, each at most max_rows_per_request queries
    search_seconds: float  # in predict, all requests
    seconds: float  # reading, loading the model, searching and writing

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.search_seconds if self.search_seconds > 0 else math.inf

    def line(self) -> str:
        return (
            f"{self.queries} queries ({self.cached} from the hot-query cache, {self.warnings} "
            f"with a warning) in {self.requests} requests: {self.queries_per_second:,.0f} "
            f"queries/s searching, {self.seconds:.1f} s in all -> {self.out} ({self.rows} rows)"
        )


def _whole(value: Any) -> int | None:
    """A k cell: None when blank or null (the default applies), else a whole number."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(repr(value)) from None
            if number.is_integer():
                return int(number)
            raise ValueError(repr(value)) from None
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(repr(value))
    if float(value).is_integer():
        return int(value)
    raise ValueError(repr(value))


def _text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {err.start})") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{path}: line {line}: a NUL byte: not a text file") from None
    return text


def _read_txt(path: Path) -> tuple[list[int], list[Any], list[Any]]:
    places, queries = [], []
    # newline="": a line ends at \n, \r\n or \r, as editors count them (and the csv module).
    for number, line in enumerate(io.StringIO(_text(path), newline=""), start=1):
        line = line.rstrip("\r\n")
        if line.strip():
            places.append(number)
            queries.append(line)
    return places, queries, [None] * len(queries)


def _read_csv(path: Path) -> tuple[list[int], list[Any], list[Any]]:
    text = _text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    places: list[int] = []
    queries: list[Any] = []
    ks: list[Any] = []
    header: list[str] | None = None
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue  # a blank line (before or after the header)
            if header is None:
                header = [cell.strip() for cell in record]
                if "query" not in header:
                    found = ", ".join(repr(c) for c in header[:8])
                    raise DataError(f"{path}: no 'query' column in the header (found {found})")
                q, k = header.index("query"), header.index("k") if "k" in header else None
                continue
            places.append(line)
            queries.append(record[q] if q < len(record) else "")
            ks.append(record[k] if k is not None and k < len(record) else None)
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None
    if header is None:
        raise DataError(f"{path}: empty: expected a header with a 'query' column, then queries")
    return places, queries, ks


def _read_parquet(path: Path) -> tuple[list[int], list[Any], list[Any]]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if "query" not in names:
            found = ", ".join(repr(c) for c in names[:8])
            raise DataError(f"{path}: no 'query' column (found {found or 'none'})")
        frame = pd.read_parquet(path, columns=["query", *(["k"] if "k" in names else [])])
    except DataError:
        raise
    except Exception as err:  # pyarrow's errors have no common base: any means unreadable
        reason = str(err).strip().splitlines()
        raise DataError(
            f"{path}: not a readable Parquet file ({reason[0] if reason else type(err).__name__})"
        ) from None
    queries = ["" if q is None or q is pd.NA else q for q in frame["query"].tolist()]
    ks = frame["k"].tolist() if "k" in frame else [None] * len(frame)
    return list(range(len(frame))), queries, ks


def read_queries(path: Path, k: int) -> QueryFile:
    """The file's queries, each with its place in the file and its k (a row's own, else `k`);
    a DataError naming the file (and the line or row) for anything that cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(
            f"{path}: unknown extension {suffix or '(none)'!r}: expected .txt, .csv or .parquet"
        )
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if k < 1:
        raise AceError(f"--k must be at least 1, got {k}")
    reader = {".txt": _read_txt, ".csv": _read_csv, ".parquet": _read_parquet}[suffix]
    places, queries, cells = reader(path)
    unit = "row" if suffix == ".parquet" else "line"
    if not queries:
        raise DataError(f"{path}: no queries in it")
    ks, own = [], []
    for place, cell in zip(places, cells, strict=True):
        try:
            value = _whole(cell)
        except ValueError as err:
            raise DataError(
                f"{path}: {unit} {place}: 'k' must be a whole number, got {err}"
            ) from None
        ks.append(k if value is None else value)
        own.append(value is not None)
    return QueryFile(path, unit, places, queries, ks, own)


_ROW = re.compile(r"^row (\d+): (.*)$", re.DOTALL)


def _located(message: str, queries: QueryFile, offset: int) -> str:
    """The model's "row i: ..." for a request starting at `offset`, as the file's place."""
    found = _ROW.match(message)
    if not found:
        return f"{queries.path}: {message}"
    i = offset + int(found.group(1))
    detail = found.group(2)
    if "'k'" in detail and not queries.own_k[i]:
        detail += " (from --k)"
    return f"{queries.where(i)}: {detail}"


def _limits(model: Any) -> tuple[Any, int | None]:
    """(the bundle's serving limits, its catalogue size), or the defaults for another model."""
    from components.config import ServingLimits

    try:
        inner = model.unwrap_python_model()
    except Exception:  # not a Python-model pyfunc: its predict checks alone
        return ServingLimits(), None
    retriever = getattr(inner, "retriever", None)
    size = len(retriever.product_ids) if retriever is not None else None
    return getattr(inner, "limits", ServingLimits()), size


def requests_of(queries: QueryFile, size: int) -> list[tuple[int, pd.DataFrame]]:
    """(offset, request frame) of at most `size` queries each, in file order."""
    return [
        (i, pd.DataFrame({"query": queries.queries[i : i + size], "k": queries.ks[i : i + size]}))
        for i in range(0, len(queries.queries), size)
    ]


def search_batches(
    model: Any, queries: QueryFile, progress: bool = False
) -> tuple[pd.DataFrame, int, float]:
    """(the model's answer frame for every query in file order, requests, seconds in predict).

    Every request is validated by the model's own rules before the first is searched; a bad
    query is a DataError naming the file and its line or row."""
    from mlflow.exceptions import MlflowException
    from tqdm import tqdm

    from components.serving.serving import validate_request

    limits, size = _limits(model)
    requests = requests_of(queries, limits.max_rows_per_request)
    if size is not None:
        for offset, frame in requests:
            try:
                validate_request(frame, limits, size)
            except MlflowException as err:
                raise DataError(_located(err.message, queries, offset)) from None
    answers = []
    seconds = 0.0
    # A real bar on a terminal; none in logs and pipes (disable=None).
    disable = None if progress else True
    bar = tqdm(total=len(queries.queries), desc="searching", unit="query", disable=disable)
    with bar:
        for offset, frame in requests:
            start = time.perf_counter()
            try:
                answers.append(model.predict(frame))
            except MlflowException as err:
                raise DataError(_located(err.message, queries, offset)) from None
            seconds += time.perf_counter() - start
            bar.update(len(frame))
    return pd.concat(answers, ignore_index=True), len(requests), seconds


def result_table(queries: QueryFile, answers: pd.DataFrame) -> Any:
    """The long table (see the module doc) as a pyarrow Table of `RESULT_SCHEMA`."""
    columns: dict[str, list[Any]] = {name: [] for name in RESULT_SCHEMA.names}
    rows = zip(
        queries.places,
        answers["query"],
        answers["product_ids"],
        answers["scores"],
        answers["cached"],
        answers["warning"],
        strict=True,
    )
    for place, query, ids, scores, cached, warning in rows:
        warning = None if warning is None or warning is pd.NA or warning != warning else warning
        n = len(ids)
        if n == 0:
            ranks, ids, scores = [None], [None], [None]
        else:
            ranks = list(range(1, n + 1))
        m = len(ranks)
        columns["query_row"] += [place] * m
        columns["query"] += [query] * m
        columns["rank"] += ranks
        columns["product_id"] += list(ids)
        columns["score"] += [None if s is None else float(s) for s in scores]
        columns["cached"] += [bool(cached)] * m
        columns["warning"] += [warning] * m
    return pa.table(columns, schema=RESULT_SCHEMA)


def default_out(params: Params, path: Path) -> Path:
    """Where results go without --out: under the (git-ignored) artifacts folder."""
    return params.paths.artifacts_dir / "search" / f"{Path(path).stem}.parquet"


def search_file(
    params: Params,
    model_uri: str,
    path: Path,
    k: int,
    out: Path | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Search every query of `path` (.txt, .csv or .parquet; see the module doc) through the
    model at `model_uri`, in requests of at most its max_rows_per_request queries, and write the
    results to `out` (default: `default_out`). The file is read and checked before the model is
    loaded and every query before any is searched; errors are one-line DataErrors naming the file
    and line, and leave `out` as it was. `progress`: a tqdm bar when stderr is a terminal."""
    started = time.perf_counter()
    path = Path(path)
    out = Path(out) if out is not None else default_out(params, path)
    if out.suffix.lower() != ".parquet":
        raise AceError(f"--out {out}: results are Parquet, give a name ending in .parquet")
    if out.exists() and path.exists() and out.resolve() == path.resolve():
        raise AceError(f"--out {out}: that is the input file; give another name")
    queries = read_queries(path, k)
    model = load_model(params, model_uri)
    answers, requests, seconds = search_batches(model, queries, progress)
    table = result_table(queries, answers)
    publish_file(out, lambda work: pq.write_table(table, work))
    return BatchSummary(
        source=path,
        out=out,
        queries=len(queries.queries),
        cached=int(answers["cached"].astype(bool).sum()),
        warnings=int(answers["warning"].notna().sum()),
        rows=table.num_rows,
        requests=requests,
        search_seconds=seconds,
        seconds=time.perf_counter() - started,
    )
