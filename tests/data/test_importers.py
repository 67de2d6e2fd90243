"""`ace data import`: each export format's mapping on a tiny sample written here, images from a
folder or fetched from a loopback server (never the internet), click logs with mapped columns,
and an imported shop that validates and trains through the pipeline's stages."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from components.config import ImportConfig, Params, ValidateConfig, load_params
from components.data import contract
from components.data.importers import (
    CLICK_FIELDS,
    QUARANTINE_FILE,
    REPORT_FILE,
    import_clicks,
    import_products,
    parse_mapping,
)
from components.data.validate import validate_data
from components.errors import AceError, DataError
from tests.conftest import ROOT, TINY_OVERRIDES
from tests.data.validate_fixtures import write_image

CFG = ImportConfig()
BIN = Path(sys.executable).parent


def _clicks(path: Path, product_ids: list[str]) -> Path:
    """A small click log over two days, in the contract's own column names."""
    rows = [
        {
            "query": f"query {d}",
            "product_id": pid,
            "position": p + 1,
            "clicked": int(p == 0),
            "day": d,
        }
        for d in range(2)
        for p, pid in enumerate(product_ids)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _validated(data_dir: Path, tmp_path: Path) -> pd.DataFrame:
    _clicks(tmp_path / "log.csv", list(pd.read_parquet(data_dir / "products.parquet").product_id))
    import_clicks(tmp_path / "log.csv", data_dir)
    validate_data(data_dir, tmp_path / "validated", ValidateConfig())
    return pd.read_parquet(tmp_path / "validated" / "products.parquet")


def _quarantine(data_dir: Path) -> list[list]:
    frame = pd.read_parquet(data_dir / QUARANTINE_FILE)
    return frame[["row", "key", "reason"]].values.tolist()


def test_amazon_export(tmp_path: Path):
    photos = tmp_path / "photos"
    by_url = write_image(photos / "51abcXYZ.jpg", 90, 80, seed=1)
    by_id = write_image(photos / "a2.png", 90, 80, seed=2, ext=".png")
    export = tmp_path / "amazon.csv"
    pd.DataFrame(
        {
            "Uniq Id": ["a1", "a2", "a3", "a4"],
            "Product Name": ["Trail Tent for 2", "acme Red Mug", "Camp Stove", "Desk Lamp"],
            "Brand Name": ["Acme", "ACME", None, "Glow"],
            "Category": [
                "Sports & Outdoors | Outdoor Recreation | Camping & Hiking | Tents",
                "Home & Kitchen | Kitchen & Dining | Mugs",
                "Sports & Outdoors",
                None,
            ],
            "Image": [
                "https://m.media-amazon.com/images/I/51abcXYZ.jpg|https://m.media-amazon.com/b.jpg",
                None,
                "https://m.media-amazon.com/images/I/not-here.jpg",
                None,
            ],
            "Selling Price": ["$10", "$3", "$40", "$20"],  # not in the contract: ignored
        }
    ).to_csv(export, index=False)
    data = tmp_path / "data"

    report = import_products(export, "amazon", data, ImportConfig(category_level=2), photos)

    products = pd.read_parquet(data / "products.parquet")
    assert products.values.tolist() == [
        ["a1", "Acme Trail Tent for 2", "Outdoor Recreation", "images/a1.jpg"],
        ["a2", "acme Red Mug", "Kitchen & Dining", "images/a2.png"],  # the brand is in it already
    ]
    assert (data / "images" / "a1.jpg").read_bytes() == by_url  # the URL's file name
    assert (data / "images" / "a2.png").read_bytes() == by_id  # the product id
    assert _quarantine(data) == [[2, "a3", "image_not_found"], [3, "a4", "no_image"]]
    assert report.summary() == (
        f"imported 2 of 4 products into {data / 'products.parquet'} (2 quarantined: "
        f"1 image_not_found, 1 no_image; see {QUARANTINE_FILE})"
    )
    record = json.loads((data / REPORT_FILE).read_text())["products"]
    assert record["rows_in"] == 4 and record["format"] == "amazon"

    import_products(export, "amazon", data, CFG, photos)  # the default level: the last
    assert pd.read_parquet(data / "products.parquet")["category"].tolist() == ["Tents", "Mugs"]
    assert len(_validated(data, tmp_path)) == 2


def test_shopify_export_merges_variant_rows_and_may_lack_a_type(tmp_path: Path):
    photos = tmp_path / "photos"
    front = write_image(photos / "red-dress.jpg", 90, 80, seed=1)
    write_image(photos / "red-dress-back.jpg", 90, 80, seed=2)
    write_image(photos / "blue-cap_1.png", 90, 80, seed=3, ext=".png")
    cdn = "https://cdn.shopify.com/s/files/1/0001/products"
    export = tmp_path / "products_export.csv"
    pd.DataFrame(
        {
            "Handle": ["red-dress", "red-dress", "blue-cap"],
            "Title": ["Red Dress", None, "Blue Cap"],
            "Body (HTML)": ["<p>Summer</p>", None, "<b>cap</b>"],
            "Vendor": ["Acme", None, "Hatco"],
            "Type": ["Dresses", None, None],
            "Option1 Value": ["S", "M", "One size"],
            "Image Src": [
                f"{cdn}/red-dress.jpg?v=1",
                f"{cdn}/red-dress-back.jpg?v=1",
                f"{cdn}/blue-cap_1.png?v=9",
            ],
            "Image Position": [1, 2, 1],
        }
    ).to_csv(export, index=False)
    data = tmp_path / "data"

    import_products(export, "shopify", data, CFG, photos)

    products = pd.read_parquet(data / "products.parquet").astype(object)
    assert products.where(products.notna(), None).values.tolist() == [
        ["red-dress", "Acme Red Dress", "Dresses", "images/red-dress.jpg"],
        ["blue-cap", "Hatco Blue Cap", None, "images/blue-cap.png"],
    ]
    assert (data / "images" / "red-dress.jpg").read_bytes() == front  # the first image
    validated = _validated(data, tmp_path)
    assert validated["category"].tolist() == ["Dresses", contract.NO_CATEGORY]


GMC_XML = """<?xml version="1.0"?>
<rss version="2.0" xmlns:g="http://base.google.com/ns/1.0"><channel><title>shop</title>
<item><g:id>sku-1</g:id><title>Linen Shirt</title><g:brand>Loom</g:brand>
<g:google_product_category>Apparel &amp; Accessories &gt; Clothing &gt; Shirts
</g:google_product_category>
<g:image_link>https://shop.example/img/sku-1.jpg</g:image_link></item>
<item><g:id>sku/2</g:id><title>Loom Wool Scarf</title><g:brand>Loom</g:brand>
<g:product_type>Accessories &gt; Scarves</g:product_type>
<g:image_link>https://shop.example/img/scarf.jpg</g:image_link></item>
</channel></rss>
"""


@pytest.mark.parametrize("feed", ["tsv", "xml"])
def test_google_merchant_center_feed(tmp_path: Path, feed: str):
    photos = tmp_path / "photos"
    write_image(photos / "sku-1.jpg", 90, 80, seed=1)
    write_image(photos / "scarf.jpg", 90, 80, seed=2)
    export = tmp_path / f"feed.{feed}"
    if feed == "xml":
        export.write_text(GMC_XML, encoding="utf-8")
    else:
        pd.DataFrame(
            {
                "id": ["sku-1", "sku/2"],
                "title": ["Linen Shirt", "Loom Wool Scarf"],
                "brand": ["Loom", "Loom"],
                "product_type": [None, "Accessories > Scarves"],
                "google_product_category": ["Apparel & Accessories > Clothing > Shirts", None],
                "image link": [
                    "https://shop.example/img/sku-1.jpg",
                    "https://shop.example/img/scarf.jpg",
                ],
            }
        ).to_csv(export, sep="\t", index=False)
    data = tmp_path / "data"

    import_products(export, "gmc", data, ImportConfig(category_level=1), photos)

    products = pd.read_parquet(data / "products.parquet")
    assert products["product_id"].tolist() == ["sku-1", "sku/2"]
    assert products["title"].tolist() == ["Loom Linen Shirt", "Loom Wool Scarf"]
    assert products["category"].tolist() == ["Apparel & Accessories", "Accessories"]
    # An id that cannot be a file name gets a safe one.
    assert products["image_path"][0] == "images/sku-1.jpg"
    assert products["image_path"][1].startswith("images/sku_2-")
    assert len(_validated(data, tmp_path)) == 2


class _Shop(http.server.BaseHTTPRequestHandler):
    """A loopback image server with every way a download can go wrong."""

    images: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        if name == "slow.jpg":
            time.sleep(2)
        if name == "redirect":
            self.send_response(302)
            self.send_header("Location", "ftp://shop.example/x.jpg")  # urllib would follow it
            self.end_headers()
            return
        kinds = {"page.html": "text/html", "lies.jpg": "image/jpeg", "untyped.png": None}
        body = {"page.html": b"<html>sale</html>", "lies.jpg": b"\xff\xd8 not a jpeg"}.get(
            name, self.images.get(name)
        )
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        kind = kinds.get(name, "image/jpeg")
        if kind:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # quiet
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up early (a refused download) is expected here


@pytest.fixture
def shop(tmp_path: Path):
    _Shop.images = {
        "ok.jpg": write_image(tmp_path / "src" / "ok.jpg", 90, 80, seed=1),
        "untyped.png": write_image(tmp_path / "src" / "u.png", 70, 70, seed=2, ext=".png"),
        "big.jpg": write_image(tmp_path / "src" / "big.jpg", 400, 400, seed=3),
        "slow.jpg": b"never sent in time",
    }
    server = _QuietServer(("127.0.0.1", 0), _Shop)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_images_checks_timeout_size_and_content(tmp_path: Path, shop: str):
    cases = {  # product id -> (image URL, quarantine reason or None)
        "ok": (f"{shop}/ok.jpg", None),
        "untyped": (f"{shop}/untyped.png", None),  # no Content-Type: the bytes decide
        "gone": (f"{shop}/gone.jpg", "fetch_http_error"),
        "page": (f"{shop}/page.html", "fetch_not_an_image"),
        "lies": (f"{shop}/lies.jpg", "fetch_not_an_image"),
        "big": (f"{shop}/big.jpg", "fetch_too_large"),
        "slow": (f"{shop}/slow.jpg", "fetch_timeout"),
        "ftp": ("ftp://shop.example/x.jpg", "fetch_bad_url"),
        "escape": (f"{shop}/redirect", "fetch_failed"),  # a redirect out of http(s)
        "closed": ("http://127.0.0.1:9/x.jpg", "fetch_failed"),
    }
    export = tmp_path / "feed.tsv"
    pd.DataFrame(
        {"id": list(cases), "title": list(cases), "image_link": [u for u, _ in cases.values()]}
    ).to_csv(export, sep="\t", index=False)
    data = tmp_path / "data"
    cfg = ImportConfig(fetch_timeout_seconds=0.5, fetch_max_bytes=60_000, fetch_workers=4)
    sizes = {name: len(data) for name, data in _Shop.images.items()}
    assert sizes["big.jpg"] > 60_000 > max(sizes["ok.jpg"], sizes["untyped.png"])

    # Without --fetch-images nothing is downloaded.
    with pytest.raises(DataError, match="no product could be imported"):
        import_products(export, "gmc", data, cfg, fetch=False)
    assert set(pd.read_parquet(data / QUARANTINE_FILE)["reason"]) == {"image_not_found"}

    report = import_products(export, "gmc", data, cfg, fetch=True)

    products = pd.read_parquet(data / "products.parquet")
    assert products["image_path"].tolist() == ["images/ok.jpg", "images/untyped.png"]
    assert (data / "images" / "ok.jpg").read_bytes() == _Shop.images["ok.jpg"]
    quarantine = pd.read_parquet(data / QUARANTINE_FILE).set_index("key")
    expected = {pid: reason for pid, (_, reason) in cases.items() if reason}
    assert quarantine["reason"].to_dict() == expected
    assert quarantine.at["gone", "detail"] == f"{shop}/gone.jpg: HTTP 404"
    assert report.rows_in == 10 and report.rows_written == 2


def test_click_log_columns_are_mapped(tmp_path: Path):
    log = pd.DataFrame(
        {
            "search_term": ["red dress", "red dress", "blue cap"],
            "sku": ["p1", "p2", "p1"],
            "rank": [1, 2, 1],
            "was_clicked": [1, 0, 0],
            "ts": ["2024-03-01T10:00:00", "2024-03-01T10:00:00", "2024-03-02T09:00:00"],
            "session": ["s1", "s1", "s2"],
        }
    )
    mapping = parse_mapping(
        [
            "query=search_term",
            "product_id=sku",
            "position=rank",
            "clicked=was_clicked",
            "timestamp=ts",
            "search_id=session",
        ],
        CLICK_FIELDS,
    )
    for fmt in ("csv", "parquet"):
        source = tmp_path / f"log.{fmt}"
        log.to_csv(source, index=False) if fmt == "csv" else log.to_parquet(source, index=False)
        report = import_clicks(source, tmp_path / fmt, mapping)
        written = pd.read_parquet(tmp_path / fmt / "impressions.parquet")
        assert list(written.columns) == [
            "search_id",
            "query",
            "product_id",
            "position",
            "clicked",
            "timestamp",
        ]
        assert written["query"].tolist() == log["search_term"].tolist()
        assert report.rows_in == report.rows_written == 3

    with pytest.raises(DataError, match=r"log\.csv: no column 'query_text' \(for query\)"):
        import_clicks(tmp_path / "log.csv", tmp_path / "x", {**mapping, "query": "query_text"})
    with pytest.raises(DataError, match=r"log\.csv: no column 'day' \(for day or timestamp\)"):
        import_clicks(
            tmp_path / "log.csv",
            tmp_path / "x",
            {k: v for k, v in mapping.items() if k != "timestamp"},
        )
    with pytest.raises(AceError, match="'price' is not one of"):
        parse_mapping(["price=cost"], CLICK_FIELDS)
    with pytest.raises(AceError, match="expected FIELD=COLUMN"):
        parse_mapping(["query"], CLICK_FIELDS)


def test_a_malformed_export_is_one_line_naming_the_line(tmp_path: Path):
    export = tmp_path / "amazon.csv"
    export.write_text("Uniq Id,Product Name,Image\na1,Tent, 2 person,x.jpg\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        import_products(export, "amazon", tmp_path / "data", CFG, tmp_path)
    assert str(caught.value) == (
        f"{export}: not a readable CSV file (line 2 has 4 fields, the header 3: an unquoted "
        "comma or quote?)"
    )
    with pytest.raises(DataError, match=r"no column 'Product Name' \(for title\)"):
        (tmp_path / "b.csv").write_text("Uniq Id,Name\na1,Tent\n", encoding="utf-8")
        import_products(tmp_path / "b.csv", "amazon", tmp_path / "data", CFG, tmp_path)
    with pytest.raises(DataError, match=r"no column 'Dept' \(for category\)"):  # named: must exist
        import_products(
            tmp_path / "b.csv",
            "amazon",
            tmp_path / "data",
            CFG,
            tmp_path,
            mapping={"title": "Name", "category": "Dept"},
        )
    with pytest.raises(AceError, match="unknown export format 'ebay'"):
        import_products(export, "ebay", tmp_path / "data", CFG, tmp_path)


def _shop_export(world: Path, out: Path, n_products: int) -> tuple[Path, Path]:
    """The tiny world's first products as a Shopify export (no Type column: no categories) and
    their impressions as a click log with the shop's own column names."""
    products = pd.read_parquet(world / "products.parquet").head(n_products)
    impressions = pd.read_parquet(world / "impressions.parquet")
    impressions = impressions[impressions["product_id"].isin(products["product_id"])]
    out.mkdir(parents=True)
    export = out / "products_export.csv"
    pd.DataFrame(
        {
            "Handle": products["product_id"],
            "Title": products["title"],
            "Vendor": "",
            "Image Src": "https://cdn.shop.example/files/"
            + products["image_path"].str.rsplit("/", n=1).str[-1],
        }
    ).to_csv(export, index=False)
    log = out / "search_log.csv"
    impressions.rename(
        columns={
            "query": "search_term",
            "product_id": "sku",
            "position": "rank",
            "clicked": "click",
        }
    ).to_csv(log, index=False)
    return export, log


@pytest.mark.slow
def test_an_imported_shop_validates_and_trains(
    tiny_world: Path, tmp_path: Path, mlflow_store: str, one_thread: None
):
    from components.stages import get_stage, run_stage

    export, log = _shop_export(tiny_world, tmp_path / "shop", 120)
    data = tmp_path / "data"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for command in (
        ["shopify", str(export), "--images", str(tiny_world / "images")],
        [
            "clicks",
            str(log),
            "--map",
            "query=search_term",
            "--map",
            "product_id=sku",
            "--map",
            "position=rank",
            "--map",
            "clicked=click",
        ],
    ):
        result = subprocess.run(
            [BIN / "ace", "data", "import", *command, "--out", str(data), "--no-dvc"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("imported ")
    bad = subprocess.run(
        [BIN / "ace", "data", "import", "clicks", str(log), "--out", str(data), "--no-dvc"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"error: {log}: no column 'query' (for query); its columns: 'search_id', 'search_term', "
        "'sku', 'rank', 'click', 'day'"
    ]

    params: Params = load_params(
        ROOT / "params.yaml",
        {
            **TINY_OVERRIDES,
            "paths.data_dir": str(data),
            "paths.artifacts_dir": str(tmp_path / "artifacts"),
            "model.variant": "cebert",
            "pretrain.device": "cpu",
            "finetune.device": "cpu",
            "features.device": "cpu",
        },
    )
    validated = run_stage(get_stage("validate"), params)
    assert validated["products_kept"] == 120 and validated["impressions_quarantined"] == 0
    products = pd.read_parquet(tmp_path / "artifacts" / "validate" / "products.parquet")
    assert set(products["category"]) == {contract.NO_CATEGORY}
    for stage in ("features", "pretrain", "finetune"):
        metrics = run_stage(get_stage(stage), params)
    # One placeholder category: every in-batch negative is "same category", i.e. random.
    assert metrics["same_category_negative_share"] == 1.0
    assert (tmp_path / "artifacts" / "finetune" / "model" / "model.safetensors").is_file()
