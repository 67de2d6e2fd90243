"""`ace data import`: a shop's own exports turned into the data contract
(components/data/contract.py).

Product exports (`FORMATS`): each is a small mapping from the export's columns to the contract's.
Column names match ignoring case, spaces and underscores; where several are listed, each row takes
the first that is not blank. `--map FIELD=COLUMN` replaces a format's choice for one field.

  amazon   Amazon-style product CSV: id = Uniq Id (else Asin), title = Product Name, category =
           Category (a path "A | B | C"), brand = Brand Name, image = Image (URLs or file names,
           "|"-separated: the first)
  shopify  Shopify product export CSV: id = Handle, title = Title, category = Type (else Product
           Category, a path "A > B"), brand = Vendor, image = Image Src
  gmc      Google Merchant Center feed (TSV, CSV, or RSS / Atom XML): id = id, title = title,
           category = product_type (else google_product_category, a path "A > B > C"),
           brand = brand, image = image_link

- title: the brand is put in front when the title does not already contain it.
- category: one level of the path, `category_level` (1 = the top; 0, the default, = the last;
  a shorter path gives its last). None given leaves it empty, and validation then puts the
  placeholder contract.NO_CATEGORY (mixed negatives fall back to random ones).
- Shopify writes one row per variant and extra image under the same Handle: the rows of a Handle
  are merged, each field taking its first non-blank value (so the first image).
- image: from `images_dir`, the file whose name is the product id (any image suffix), else the
  file named like the export's image value (the URL's last path segment); copied to
  `images/<id><suffix>`. Otherwise, only when `fetch` is set, downloaded from the http(s) URL with
  a timeout, a size limit, and the content checked (an image/* type, if the server names one, and
  bytes that decode as an image). A product without an image is quarantined with the reason.

Click logs (`import_clicks`): a CSV or Parquet file whose columns are mapped to the contract's
impression fields (search_id, query, product_id, position, clicked, and day or timestamp); by
default each field reads the column of its own name. Values are written as read: validation
judges them.

Each import writes its table into `out_dir` (products.parquet with images/, or
impressions.parquet), its rejected rows to import_quarantine.parquet (table, row = 0-based data row
of the export, key, reason, detail; the validate stage's columns) and a record of the source,
mapping and counts to import.json. Rows in = rows written + rows quarantined, always. A problem
with the export itself (unreadable, a mapped column missing) is one AceError line naming the file.

Product quarantine reasons: `no_id`, `no_image` (the export gives none and nothing in
`images_dir` is named by the id), `image_not_found` (given, not in `images_dir`, not fetched),
`fetch_bad_url` (not http or https), `fetch_http_error`, `fetch_timeout`, `fetch_too_large`,
`fetch_not_an_image`, `fetch_failed` (the connection).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa

from components.config import ImportConfig
from components.data import contract
from components.data.validate import QUARANTINE_COLUMNS, check_csv_records
from components.errors import AceError, DataError

QUARANTINE_FILE = "import_quarantine.parquet"
REPORT_FILE = "import.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
PRODUCT_FIELDS = ("id", "title", "category", "brand", "image")
CLICK_FIELDS = (*contract.IMPRESSION_COLUMNS, "timestamp")


@dataclasses.dataclass(frozen=True)
class ProductFormat:
    """Where one kind of product export keeps each field (see the module doc's table)."""

    columns: Mapping[str, tuple[str, ...]]  # field -> candidate columns, first non-blank wins
    category_separator: str
    image_separator: str | None = None  # several images in one cell
    merge_rows: bool = False  # several rows per id (Shopify's variants and extra images)


FORMATS: dict[str, ProductFormat] = {
    "amazon": ProductFormat(
        columns={
            "id": ("Uniq Id", "Asin"),
            "title": ("Product Name",),
            "category": ("Category",),
            "brand": ("Brand Name",),
            "image": ("Image",),
        },
        category_separator="|",
        image_separator="|",
    ),
    "shopify": ProductFormat(
        columns={
            "id": ("Handle",),
            "title": ("Title",),
            "category": ("Type", "Product Category"),
            "brand": ("Vendor",),
            "image": ("Image Src",),
        },
        category_separator=">",
        merge_rows=True,
    ),
    "gmc": ProductFormat(
        columns={
            "id": ("id",),
            "title": ("title",),
            "category": ("product_type", "google_product_category"),
            "brand": ("brand",),
            "image": ("image_link",),
        },
        category_separator=">",
    ),
}


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """One import's counts; rows in = written + quarantined, always."""

    table: str
    source: str
    rows_in: int
    rows_written: int
    reasons: dict[str, int]
    written_to: str

    def __post_init__(self) -> None:
        if self.rows_in != self.rows_written + sum(self.reasons.values()):
            raise ValueError(
                f"{self.table}: {self.rows_in} in != {self.rows_written} written + "
                f"{sum(self.reasons.values())} quarantined"
            )

    def summary(self) -> str:
        quarantined = sum(self.reasons.values())
        line = f"imported {self.rows_written} of {self.rows_in} {self.table} into {self.written_to}"
        if quarantined:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))
            line += f" ({quarantined} quarantined: {reasons}; see {QUARANTINE_FILE})"
        return line


def parse_mapping(pairs: list[str] | None, fields: tuple[str, ...]) -> dict[str, str]:
    """`--map FIELD=COLUMN` options as {field: column}; unknown fields are refused."""
    mapping = {}
    for pair in pairs or []:
        field, sep, column = pair.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise AceError(f"--map {pair!r}: expected FIELD=COLUMN, e.g. query=search_term")
        if field.strip() not in fields:
            raise AceError(f"--map {pair!r}: {field.strip()!r} is not one of {', '.join(fields)}")
        mapping[field.strip()] = column.strip()
    return mapping


# --- reading an export ---------------------------------------------------------------------------


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", " ", str(name).strip().lower())


def read_export(path: Path) -> pd.DataFrame:
    """Every column of a CSV / TSV / Parquet / RSS-or-Atom XML export, as text (NA = blank)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".xml":
            return _read_feed_xml(path)
        check_csv_records(path, delimiter="\t" if suffix in (".tsv", ".txt") else ",")
        return pd.read_csv(
            path,
            sep="\t" if suffix in (".tsv", ".txt") else ",",
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            encoding="utf-8-sig",
            encoding_errors="replace",
        )
    except (ValueError, OSError, pa.ArrowException, ElementTree.ParseError) as err:
        lines = str(err).strip().splitlines()
        raise DataError(f"{path}: not a readable export ({lines[0] if lines else err})") from err


def _read_feed_xml(path: Path) -> pd.DataFrame:
    """An RSS 2.0 (<item>) or Atom (<entry>) product feed: one row per item, one column per
    child element by its local name (g:id -> id)."""
    rows = []
    for element in ElementTree.parse(path).getroot().iter():
        if _local(element.tag) in ("item", "entry"):
            rows.append(
                {_local(child.tag): (child.text or "").strip() or None for child in element}
            )
    return pd.DataFrame(rows, dtype=object)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _column(frame: pd.DataFrame, path: Path, name: str, field: str) -> str:
    """The export's column called `name` (case, spaces and underscores ignored)."""
    by_key = {_key(c): c for c in frame.columns}
    if _key(name) not in by_key:
        shown = ", ".join(repr(str(c)) for c in list(frame.columns)[:12])
        raise DataError(f"{path}: no column {name!r} (for {field}); its columns: {shown}")
    return by_key[_key(name)]


def _field(
    frame: pd.DataFrame, path: Path, field: str, candidates: tuple[str, ...], required: bool
) -> pd.Series:
    """Per row, the first non-blank value among the candidate columns present."""
    by_key = {_key(c): c for c in frame.columns}
    present = [by_key[_key(c)] for c in candidates if _key(c) in by_key]
    if not present:
        if required:
            _column(frame, path, candidates[0], field)  # raises, naming the column
        return pd.Series(pd.NA, index=frame.index, dtype="string")
    values = pd.Series(pd.NA, index=frame.index, dtype="string")
    for column in present:
        text = frame[column].astype("string").str.strip()
        values = values.fillna(text.mask(text == ""))
    return values


# --- products ------------------------------------------------------------------------------------


def import_products(
    source: Path,
    kind: str,
    out_dir: Path,
    cfg: ImportConfig,
    images_dir: Path | None = None,
    fetch: bool = False,
    mapping: Mapping[str, str] | None = None,
) -> ImportReport:
    """Turn a product export into `out_dir/products.parquet` and `out_dir/images/`."""
    if kind not in FORMATS:
        raise AceError(f"unknown export format {kind!r}: one of {', '.join(FORMATS)}, or clicks")
    fmt = FORMATS[kind]
    source, out_dir = Path(source), Path(out_dir)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise AceError(f"--images {images_dir}: not a folder")
    columns = {
        f: (mapping[f],) if mapping and f in mapping else fmt.columns[f] for f in fmt.columns
    }
    export = read_export(source)
    required = {"id", "title", *(mapping or {})}  # a column named by --map must exist
    fields = pd.DataFrame(
        {f: _field(export, source, f, columns[f], f in required) for f in PRODUCT_FIELDS}
    )
    fields["row"] = np.arange(len(fields))
    if fmt.merge_rows:  # one product per id; rows without an id stay rows (quarantined)
        with_id = fields["id"].notna()
        merged = fields[with_id].groupby("id", sort=False, as_index=False).first()
        fields = pd.concat([merged, fields[~with_id]]).sort_values("row", ignore_index=True)
    if fmt.image_separator:  # the first of several images in one cell
        parts = fields["image"].str.split(fmt.image_separator)
        fields["image"] = parts.map(
            lambda ps: next((p.strip() for p in ps if p.strip()), None), na_action="ignore"
        ).astype("string")

    products = pd.DataFrame(
        {
            "product_id": fields["id"],
            "title": [
                _with_brand(t, b) for t, b in zip(fields["title"], fields["brand"], strict=True)
            ],
            "category": _category_level(
                fields["category"], fmt.category_separator, cfg.category_level
            ),
        }
    ).astype("string")
    images_out = out_dir / contract.IMAGES_DIR
    images_out.mkdir(parents=True, exist_ok=True)
    found = _find_images(fields, images_dir, images_out, fetch, cfg)
    products["image_path"] = pd.Series(
        [f"{contract.IMAGES_DIR}/{name}" if name else None for name, _, _ in found], dtype="string"
    )
    failed = np.array([name is None for name, _, _ in found], bool)
    quarantine = pd.DataFrame(
        {
            "table": contract.PRODUCTS,
            "row": fields["row"].to_numpy()[failed],
            "key": products["product_id"].to_numpy()[failed],
            "reason": [r for (_, r, _), bad in zip(found, failed, strict=True) if bad],
            "detail": [d for (_, _, d), bad in zip(found, failed, strict=True) if bad],
        }
    )
    kept = products[~failed].reset_index(drop=True)
    kept.to_parquet(out_dir / f"{contract.PRODUCTS}.parquet", index=False)
    report = _record(
        out_dir,
        contract.PRODUCTS,
        source,
        len(products),
        quarantine,
        {
            "format": kind,
            "columns": columns,
            "category_level": cfg.category_level,
            "images_dir": str(images_dir) if images_dir else None,
            "fetch_images": fetch,
        },
    )
    if kept.empty:
        raise DataError(f"{source}: no product could be imported ({report.summary()})")
    return report


def _with_brand(title: object, brand: object) -> str | None:
    if not isinstance(title, str):
        return None
    if isinstance(brand, str) and brand.casefold() not in title.casefold():
        return f"{brand} {title}"
    return title


def _category_level(paths: pd.Series, separator: str, level: int) -> pd.Series:
    """One level of each category path (1 = the top, 0 = the last; a shorter path: its last)."""

    def pick(path: object) -> str | None:
        if not isinstance(path, str):
            return None
        parts = [p.strip() for p in path.split(separator) if p.strip()]
        if not parts:
            return None
        return parts[-1] if level == 0 else parts[min(level, len(parts)) - 1]

    return paths.map(pick, na_action="ignore").astype("string")


def _safe_name(product_id: str) -> str:
    """A file name for a product id: the id itself when it is plain, else a slug plus a hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", product_id).strip("._")[:80]
    if slug == product_id:
        return slug
    return f"{slug or 'product'}-{hashlib.blake2b(product_id.encode(), digest_size=4).hexdigest()}"


def _url_name(value: str) -> str:
    """The file name an image value points at: a URL's last path segment, or a path's name."""
    path = urlsplit(value).path if "://" in value else value
    return PurePosixPath(unquote(path).replace("\\", "/")).name


class _ImageFolder:
    """The image files under a folder, found by stem (a product id) or by file name."""

    def __init__(self, root: Path) -> None:
        self.by_stem: dict[str, Path] = {}
        self.by_name: dict[str, Path] = {}
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if path.is_file():
                self.by_stem.setdefault(path.stem.casefold(), path)
                self.by_name.setdefault(path.name.casefold(), path)

    def find(self, product_id: str, value: str | None) -> Path | None:
        named = _url_name(value).casefold() if value else ""
        return (
            self.by_stem.get(product_id.casefold())
            or (self.by_name.get(named) if named else None)
            or (self.by_stem.get(PurePosixPath(named).stem) if named else None)
        )


Found = tuple[str | None, str, str]  # (file name under images/, or None; reason; detail)


def _find_images(
    fields: pd.DataFrame, images_dir: Path | None, out: Path, fetch: bool, cfg: ImportConfig
) -> list[Found]:
    folder = _ImageFolder(Path(images_dir)) if images_dir else None

    def one(product_id: object, value: object) -> Found:
        if not isinstance(product_id, str):
            return None, "no_id", "the row has no product id"
        value = value if isinstance(value, str) else None
        local = folder.find(product_id, value) if folder else None
        if local is not None:
            name = _safe_name(product_id) + local.suffix.lower()
            shutil.copyfile(local, out / name)
            return name, "", ""
        if value is None:
            return None, "no_image", "no image in the export, and none named by the id"
        if not fetch:
            where = f"not in {images_dir}" if images_dir else "no --images folder"
            return None, "image_not_found", f"{value} ({where}; --fetch-images downloads it)"
        data, reason, detail = fetch_image(value, cfg.fetch_timeout_seconds, cfg.fetch_max_bytes)
        if data is None:
            return None, reason, detail
        name = _safe_name(product_id) + _suffix(data)
        (out / name).write_bytes(data)
        return name, "", ""

    with ThreadPoolExecutor(cfg.fetch_workers if fetch else 1) as pool:
        return list(pool.map(one, fields["id"], fields["image"]))


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.URLError(f"redirect to a non-http URL {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def fetch_image(url: str, timeout: float, max_bytes: int) -> tuple[bytes | None, str, str]:
    """(the image's bytes, "", "") or (None, quarantine reason, detail)."""
    if urlsplit(url).scheme not in ("http", "https"):
        return None, "fetch_bad_url", f"{url!r} is not an http(s) URL"
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "ace-data-import"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            kind = response.headers.get("Content-Type")
            if kind and not kind.split(";")[0].strip().lower().startswith("image/"):
                return None, "fetch_not_an_image", f"{url}: Content-Type {kind}"
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                return None, "fetch_too_large", f"{url}: {declared} bytes, at most {max_bytes}"
            data = bytearray()
            while chunk := response.read(65536):
                data += chunk
                if len(data) > max_bytes:
                    return None, "fetch_too_large", f"{url}: over {max_bytes} bytes"
                if time.monotonic() > deadline:
                    return None, "fetch_timeout", f"{url}: not done within {timeout:g} s"
    except urllib.error.HTTPError as err:
        return None, "fetch_http_error", f"{url}: HTTP {err.code}"
    except TimeoutError:
        return None, "fetch_timeout", f"{url}: no answer within {timeout:g} s"
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            return None, "fetch_timeout", f"{url}: no answer within {timeout:g} s"
        return None, "fetch_failed", f"{url}: {err.reason}"
    except (OSError, ValueError) as err:
        return None, "fetch_failed", f"{url}: {err}"
    if cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_UNCHANGED) is None:
        return None, "fetch_not_an_image", f"{url}: {len(data)} bytes that do not decode"
    return bytes(data), "", ""


def _suffix(data: bytes) -> str:
    """A decoded image's usual suffix, from its first bytes (OpenCV reads any by content)."""
    for magic, suffix in (
        (b"\xff\xd8", ".jpg"),
        (b"\x89PNG", ".png"),
        (b"BM", ".bmp"),
        (b"II*\x00", ".tif"),
        (b"MM\x00*", ".tif"),
    ):
        if data.startswith(magic):
            return suffix
    return ".webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else ".img"


# --- click logs ----------------------------------------------------------------------------------


def import_clicks(
    source: Path, out_dir: Path, mapping: Mapping[str, str] | None = None
) -> ImportReport:
    """Turn a click log into `out_dir/impressions.parquet` (columns renamed, values as read)."""
    source, out_dir = Path(source), Path(out_dir)
    log = read_export(source)
    mapping = dict(mapping or {})
    by_key = {_key(c): c for c in log.columns}
    chosen: dict[str, str] = {}
    for field in CLICK_FIELDS:
        name = mapping.get(field, field)
        if field in mapping or _key(name) in by_key:
            chosen[field] = _column(log, source, name, field)
    for field in ("query", "product_id", "position", "clicked"):
        if field not in chosen:
            _column(log, source, field, field)  # raises, naming the column
    if "day" not in chosen and "timestamp" not in chosen:
        _column(log, source, "day", "day or timestamp")
    impressions = pd.DataFrame({field: log[column] for field, column in chosen.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    impressions.to_parquet(out_dir / f"{contract.IMPRESSIONS}.parquet", index=False)
    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in QUARANTINE_COLUMNS})
    return _record(
        out_dir, contract.IMPRESSIONS, source, len(impressions), empty, {"columns": chosen}
    )


# --- the record of what was imported -------------------------------------------------------------


def _record(
    out_dir: Path,
    table: str,
    source: Path,
    rows_in: int,
    quarantine: pd.DataFrame,
    how: dict,
) -> ImportReport:
    """Write this table's rejected rows and its entry in import.json; the report."""
    quarantine_file = out_dir / QUARANTINE_FILE
    if quarantine_file.exists():  # the other table's rows stay
        earlier = pd.read_parquet(quarantine_file)
        parts = [part for part in (earlier[earlier["table"] != table], quarantine) if len(part)]
        quarantine = pd.concat(parts, ignore_index=True) if parts else quarantine
    quarantine.astype(
        {"table": "string", "row": "int64", "key": "string", "reason": "string", "detail": "string"}
    ).to_parquet(quarantine_file, index=False)
    mine = quarantine[quarantine["table"] == table]
    report = ImportReport(
        table=table,
        source=str(source),
        rows_in=rows_in,
        rows_written=rows_in - len(mine),
        reasons={str(k): int(n) for k, n in mine["reason"].value_counts().items()},
        written_to=str(out_dir / f"{table}.parquet"),
    )
    record_file = out_dir / REPORT_FILE
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.exists() else {}
    record[table] = {**dataclasses.asdict(report), **how}
    record_file.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return report
