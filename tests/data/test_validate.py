"""The validate stage: clean data passes whole; each kind of bad row is quarantined, alone, with
the right reason; broken inputs fail with a one-line DataError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import ValidateConfig
from components.data import contract
from components.data import validate as validate_module
from components.data.validate import ValidationReport, validate_data
from components.errors import DataError
from tests.data.validate_fixtures import (
    clean_tables,
    insert_row,
    replace_bytes,
    write_image,
    write_tables,
)

LENIENT = ValidateConfig(max_quarantine_share=0.5)  # one bad row must not trip the threshold


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _typed(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    return frame[list(columns)].astype(columns).reset_index(drop=True)


def _outputs(out: Path):
    return (
        pd.read_parquet(out / "products.parquet"),
        pd.read_parquet(out / "impressions.parquet"),
        pd.read_parquet(out / "quarantine.parquet"),
        json.loads((out / "validation.json").read_text()),
    )


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_clean_data_passes_whole(data_dir, tmp_path, fmt):
    products, impressions = clean_tables(data_dir)
    write_tables(data_dir, products, impressions, fmt)
    out = tmp_path / "out"

    report = validate_data(data_dir, out, ValidateConfig())

    kept_products, kept_impressions, quarantine, summary = _outputs(out)
    assert (report.products_in, report.products_kept, report.products_quarantined) == (20, 20, 0)
    assert (report.impressions_in, report.impressions_kept) == (100, 100)
    assert report.reasons == {} and quarantine.empty
    pd.testing.assert_frame_equal(kept_products, _typed(products, contract.PRODUCT_COLUMNS))
    pd.testing.assert_frame_equal(
        kept_impressions, _typed(impressions, contract.IMPRESSION_COLUMNS)
    )
    assert list(quarantine.columns) == ["table", "row", "key", "reason", "detail"]
    assert summary["success"] is True
    assert summary["thresholds"]["min_image_side"] == 64
    checks = summary["tables"]["products"]["expectations"]
    assert all(c["success"] for c in checks) and len(checks) >= 12
    assert any(c["column"] == "image_status" for c in checks)
    assert (out / "data_docs" / "products.html").stat().st_size > 1000
    metrics = report.metrics()
    assert metrics["products_in"] == 20.0 and metrics["impressions_quarantine_share"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def _break_image(data_dir: Path, kind: str) -> str:
    """Write a bad image of `kind`; returns its path relative to data_dir."""
    relative = f"images/bad_{kind}.jpg"
    path = data_dir / relative
    if kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(2000))
    elif kind == "truncated":
        full = write_image(path, 120, 120, seed=5)
        path.write_bytes(full[: len(full) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "tiny":
        write_image(path, 20, 30, seed=6)
    return relative


# (case id, table, row the bad row is inserted at, column -> value, reason, formats)
PRODUCT_CASES = [
    ("duplicate_id", 7, {"product_id": "p003", "title": "other"}, "duplicate_product_id"),
    ("missing_image", 7, {"product_id": "px", "image_path": "images/nope.jpg"}, "missing_image"),
    ("random_bytes", 7, {"product_id": "px", "image_path": "@random"}, "corrupt_image"),
    ("truncated_jpeg", 7, {"product_id": "px", "image_path": "@truncated"}, "corrupt_image"),
    ("empty_file", 7, {"product_id": "px", "image_path": "@empty"}, "corrupt_image"),
    ("tiny_image", 7, {"product_id": "px", "image_path": "@tiny"}, "image_too_small"),
    ("outside_dir", 7, {"product_id": "px", "image_path": "../x.jpg"}, "image_outside_data_dir"),
    ("empty_title", 0, {"product_id": "px", "title": "   "}, "empty_title"),
    ("long_title", 20, {"product_id": "px", "title": "x" * 600}, "title_too_long"),
    ("null_image_path", 7, {"product_id": "px", "image_path": None}, "null:image_path"),
    ("blank_image_path", 7, {"product_id": "px", "image_path": " "}, "null:image_path"),
    ("null_product_id", 7, {"product_id": None}, "null:product_id"),
]
IMPRESSION_CASES = [
    ("unknown_product", 42, {"product_id": "nope"}, "unknown_product"),
    ("negative_position", 42, {"position": -1}, "position_out_of_range"),
    ("position_too_big", 42, {"position": 101}, "position_out_of_range"),
    ("clicked_two", 42, {"clicked": 2}, "clicked_not_binary"),
    ("negative_day", 42, {"day": -1}, "negative_day"),
    ("empty_query", 42, {"query": " "}, "empty_query"),
    ("long_query", 42, {"query": "q" * 200}, "query_too_long"),
    ("null_query", 99, {"query": None}, "null:query"),
]
CSV_ONLY_CASES = [
    ("products", "utf8_title", 7, {"product_id": "px", "title": "@@BAD@@"}, "invalid_utf8:title"),
    ("impressions", "utf8_query", 5, {"query": "@@BAD@@"}, "invalid_utf8:query"),
    ("impressions", "abc_position", 42, {"position": "abc"}, "bad_type:position"),
    ("impressions", "float_position", 42, {"position": "2.5"}, "bad_type:position"),
    ("impressions", "abc_clicked", 42, {"clicked": "yes"}, "bad_type:clicked"),
]
CASES = [
    pytest.param(table, at, change, reason, fmt, id=f"{name}-{fmt}")
    for table, cases in (("products", PRODUCT_CASES), ("impressions", IMPRESSION_CASES))
    for name, at, change, reason in cases
    for fmt in ("parquet", "csv")
] + [
    pytest.param(table, at, change, reason, "csv", id=f"{name}-csv")
    for table, name, at, change, reason in CSV_ONLY_CASES
]


@pytest.mark.parametrize(("table", "at", "change", "reason", "fmt"), CASES)
def test_bad_row_is_quarantined_alone(data_dir, tmp_path, table, at, change, reason, fmt):
    products, impressions = clean_tables(data_dir)
    change = {
        k: _break_image(data_dir, v[1:])
        if isinstance(v, str) and v.startswith("@") and v != "@@BAD@@"
        else v
        for k, v in change.items()
    }
    tables = {"products": products, "impressions": impressions}
    tables[table] = insert_row(tables[table], at, **change)
    paths = dict(zip(tables, write_tables(data_dir, *tables.values(), fmt), strict=True))
    if "@@BAD@@" in change.values():
        replace_bytes(paths[table], "@@BAD@@", b"caf\xe9 \xff")  # latin-1, not UTF-8

    report = validate_data(data_dir, tmp_path / "out", LENIENT)

    kept = dict(zip(tables, _outputs(tmp_path / "out")[:2], strict=True))
    quarantine, summary = _outputs(tmp_path / "out")[2:]
    assert quarantine[["table", "row", "reason"]].values.tolist() == [[table, at, reason]]
    assert quarantine["detail"].str.len().iloc[0] > 5
    # Nothing else lost: every other row kept, untouched.
    columns = {"products": contract.PRODUCT_COLUMNS, "impressions": contract.IMPRESSION_COLUMNS}
    for name, frame in tables.items():
        expected = frame.drop(index=at) if name == table else frame
        pd.testing.assert_frame_equal(kept[name], _typed(expected, columns[name]))
    assert report.reasons == {f"{table}/{reason}": 1}
    assert report.products_in == report.products_kept + report.products_quarantined
    assert report.impressions_in == report.impressions_kept + report.impressions_quarantined
    # GX made the call: the expectation owning this reason saw exactly this row as unexpected.
    owners = [
        e
        for e in summary["tables"][table]["expectations"]
        if reason in e["quarantine_reason"].split(" | ")
    ]
    assert len(owners) == 1 and owners[0]["unexpected_count"] == 1 and not owners[0]["success"]


def test_bad_row_detail_names_the_problem(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    products = insert_row(products, 3, product_id="px", image_path=_break_image(data_dir, "tiny"))
    write_tables(data_dir, products, impressions, "parquet")

    validate_data(data_dir, tmp_path / "out", LENIENT)

    row = pd.read_parquet(tmp_path / "out" / "quarantine.parquet").iloc[0]
    assert (row["key"], row["reason"]) == ("px", "image_too_small")
    assert row["detail"] == "image images/bad_tiny.jpg is 20x30 px, below 64"


def test_invalid_utf8_in_parquet_binary_column(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    titles = [t.encode() for t in products["title"]]
    titles[4] = b"caf\xe9"
    table = pa.Table.from_pandas(products, preserve_index=False)
    table = table.set_column(1, "title", pa.array(titles, pa.binary()))
    pq.write_table(table, data_dir / "products.parquet")
    impressions.to_parquet(data_dir / "impressions.parquet", index=False)

    report = validate_data(data_dir, tmp_path / "out", LENIENT)

    quarantine = pd.read_parquet(tmp_path / "out" / "quarantine.parquet")
    rows = quarantine[quarantine["table"] == "products"]
    assert rows[["row", "key", "reason"]].values.tolist() == [[4, "p004", "invalid_utf8:title"]]
    assert rows["detail"].iloc[0] == "title has bytes that are not UTF-8: caf\\xe9"
    # The product is gone, so its impressions follow it, with their own reason.
    assert set(quarantine.loc[quarantine["table"] == "impressions", "reason"]) <= {
        "product_quarantined"
    }
    assert report.products_kept == 19


def test_impressions_of_a_quarantined_product_follow_it(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    products.loc[5, "image_path"] = _break_image(data_dir, "random")
    write_tables(data_dir, products, impressions, "parquet")

    report = validate_data(data_dir, tmp_path / "out", LENIENT)

    quarantine = pd.read_parquet(tmp_path / "out" / "quarantine.parquet")
    follow = quarantine[quarantine["table"] == "impressions"]
    expected_rows = impressions.index[impressions["product_id"] == "p005"].tolist()
    assert expected_rows and follow["row"].tolist() == expected_rows
    assert set(follow["reason"]) == {"product_quarantined"}
    assert follow["detail"].iloc[0] == "product 'p005' was quarantined (corrupt_image)"
    assert report.impressions_kept == 100 - len(expected_rows)


def test_first_failing_check_wins(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    # A repeated id outranks an empty title and a missing image.
    products = insert_row(products, 2, product_id="p000", title="", image_path="no.jpg")
    write_tables(data_dir, products, impressions, "parquet")

    report = validate_data(data_dir, tmp_path / "out", LENIENT)

    assert report.reasons == {"products/duplicate_product_id": 1}


def test_share_above_threshold_fails_but_writes_outputs(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    for _ in range(2):
        products = insert_row(products, 0, product_id="px", image_path="images/none.jpg")
    products.loc[1, "product_id"] = "py"
    write_tables(data_dir, products, impressions, "parquet")
    out = tmp_path / "out"

    with pytest.raises(DataError) as caught:
        validate_data(data_dir, out, ValidateConfig(max_quarantine_share=0.05))

    message = str(caught.value)
    assert message == (
        f"{data_dir / 'products.parquet'}: 9.1% of rows quarantined (limit 5.0%): 2 missing_image"
    )
    assert "\n" not in message
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert quarantine["reason"].tolist() == ["missing_image"] * 2
    summary = json.loads((out / "validation.json").read_text())
    assert summary["success"] is False and summary["failures"] == [message]


def test_missing_file(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    write_tables(data_dir, products, impressions, "parquet")
    (data_dir / "impressions.parquet").unlink()

    with pytest.raises(DataError, match=r"impressions\.parquet: file not found") as caught:
        validate_data(data_dir, tmp_path / "out", ValidateConfig())
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_missing_column(data_dir, tmp_path, fmt):
    products, impressions = clean_tables(data_dir)
    write_tables(data_dir, products, impressions.drop(columns="position"), fmt)

    with pytest.raises(DataError) as caught:
        validate_data(data_dir, tmp_path / "out", ValidateConfig())
    assert str(caught.value) == f"{data_dir / f'impressions.{fmt}'}: missing column 'position'"


def test_missing_day_and_timestamp_asks_for_day(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    write_tables(data_dir, products, impressions.drop(columns="day"), "parquet")

    with pytest.raises(DataError, match=r"impressions\.parquet: missing column 'day'$"):
        validate_data(data_dir, tmp_path / "out", ValidateConfig())


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("products.parquet", b"this is not parquet at all" * 10, "not a readable Parquet file"),
        ("products.csv", b'product_id,title\n"p1,unclosed quote\n', "not a readable CSV file"),
        ("products.csv", b"", "not a readable CSV file"),
    ],
)
def test_unreadable_file(data_dir, tmp_path, name, content, expected):
    products, impressions = clean_tables(data_dir)
    write_tables(data_dir, products, impressions, "parquet")
    (data_dir / "products.parquet").unlink()
    (data_dir / name).write_bytes(content)

    with pytest.raises(DataError) as caught:
        validate_data(data_dir, tmp_path / "out", ValidateConfig())
    message = str(caught.value)
    assert message.startswith(f"{data_dir / name}: {expected}") and "\n" not in message


def test_search_id_derived_from_day_and_query(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    write_tables(data_dir, products, impressions.drop(columns="search_id"), "csv")

    report = validate_data(data_dir, tmp_path / "out", ValidateConfig())

    kept = pd.read_parquet(tmp_path / "out" / "impressions.parquet")
    assert report.impressions_kept == 100 and kept["search_id"].notna().all()
    groups = kept.groupby("search_id")[["day", "query"]].nunique()
    assert (groups == 1).all().all()  # one search id never spans two days or queries
    assert len(groups) == len(impressions.drop_duplicates(["day", "query"]))
    summary = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert summary["derived"] == {
        "search_id": True,
        "day_from_timestamp": False,
        "category_placeholder_rows": 0,
    }


@pytest.mark.parametrize("as_text", [True, False])
def test_timestamp_accepted_instead_of_day(data_dir, tmp_path, as_text):
    products, impressions = clean_tables(data_dir)
    # Day 0 starts late in the evening: day numbers count dates, not 24-hour spans.
    stamps = pd.Timestamp("2024-03-01 22:30") + pd.to_timedelta(impressions["day"], unit="D")
    stamps = stamps + pd.to_timedelta(np.where(impressions["day"] > 0, -20, 0), unit="h")
    timed = impressions.drop(columns="day").assign(
        timestamp=stamps.dt.strftime("%Y-%m-%dT%H:%M:%S") if as_text else stamps
    )
    timed.loc[7, "timestamp"] = "not a time" if as_text else pd.NaT
    write_tables(data_dir, products, timed, "csv" if as_text else "parquet")

    report = validate_data(data_dir, tmp_path / "out", LENIENT)

    kept = pd.read_parquet(tmp_path / "out" / "impressions.parquet")
    assert kept["day"].tolist() == impressions.drop(index=7)["day"].tolist()
    reason = "bad_type:timestamp" if as_text else "null:timestamp"
    assert report.reasons == {f"impressions/{reason}": 1}


def test_output_replaced_atomically(data_dir, tmp_path, monkeypatch):
    products, impressions = clean_tables(data_dir)
    write_tables(data_dir, products, impressions, "parquet")
    out = tmp_path / "stage" / "out"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older run")

    validate_data(data_dir, out, ValidateConfig())
    assert not (out / "stale.txt").exists() and (out / "validation.json").exists()
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging dirs left

    def crash(staging, *args):
        (staging / "products.parquet").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(validate_module, "write_outputs", crash)
    with pytest.raises(OSError, match="disk full"):
        validate_data(data_dir, out, ValidateConfig())
    assert pd.read_parquet(out / "products.parquet").shape == (20, 4)  # previous output intact
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging dirs left


def test_report_refuses_counts_that_do_not_reconcile():
    with pytest.raises(ValueError, match="products"):
        ValidationReport(10, 8, 1, 5, 5, 0, {"products/missing_image": 1}, 0.1)
    with pytest.raises(ValueError, match="impressions"):
        ValidationReport(10, 9, 1, 5, 4, 1, {"products/missing_image": 1}, 0.1)
    report = ValidationReport(10, 9, 1, 5, 5, 0, {"products/null:title": 1}, 0.1)
    assert report.products_quarantine_share == pytest.approx(0.1)
    assert report.metrics()["quarantined.products.null.title"] == 1.0


# --- hostile inputs (issue 17): each a quarantine reason or one line naming the file ----------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_category_is_optional_and_always_in_the_output(data_dir, tmp_path, fmt):
    products, impressions = clean_tables(data_dir)
    products.loc[3, "category"] = None
    products.loc[4, "category"] = "  "
    write_tables(data_dir, products, impressions, fmt)
    report = validate_data(data_dir, tmp_path / "out", ValidateConfig())
    kept, _, quarantine, summary = _outputs(tmp_path / "out")
    assert report.products_kept == 20 and quarantine.empty
    assert kept["category"].tolist()[2:6] == [
        "c2",
        contract.NO_CATEGORY,
        contract.NO_CATEGORY,
        "c1",
    ]
    assert summary["derived"]["category_placeholder_rows"] == 2

    write_tables(data_dir, products.drop(columns="category"), impressions, fmt)
    validate_data(data_dir, tmp_path / "out", ValidateConfig())
    kept, _, _, summary = _outputs(tmp_path / "out")
    assert list(kept.columns) == list(contract.PRODUCT_COLUMNS)
    assert set(kept["category"]) == {contract.NO_CATEGORY}
    assert summary["derived"]["category_placeholder_rows"] == 20


def test_symlinks_are_resolved_before_the_data_folder_check(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    outside = tmp_path / "elsewhere" / "secret.jpg"
    write_image(outside, 100, 100)
    (data_dir / "images" / "out.jpg").symlink_to(outside)
    (data_dir / "images" / "in.jpg").symlink_to(data_dir / "images" / "p001.jpg")
    (data_dir / "images" / "loop.jpg").symlink_to(data_dir / "images" / "loop.jpg")
    products.loc[3, "image_path"] = "images/out.jpg"
    products.loc[4, "image_path"] = "images/in.jpg"  # a link that stays inside is fine
    products.loc[5, "image_path"] = "images/loop.jpg"
    write_tables(data_dir, products, impressions, "parquet")

    validate_data(data_dir, tmp_path / "out", LENIENT)

    quarantine = _outputs(tmp_path / "out")[2]
    rows = quarantine[quarantine["table"] == "products"]
    assert rows[["row", "reason"]].values.tolist() == [
        [3, "image_outside_data_dir"],
        [5, "missing_image"],
    ]


def test_a_symlink_into_the_projects_dvc_cache_is_inside(tmp_path):
    # With DVC's `cache.type: symlink`, every data file is a link into .dvc/cache.
    data_dir = tmp_path / "project" / "data"
    products, impressions = clean_tables(data_dir)
    cached = tmp_path / "project" / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef"
    cached.parent.mkdir(parents=True)
    (data_dir / "images" / "p002.jpg").rename(cached)
    (data_dir / "images" / "p002.jpg").symlink_to(cached)
    write_tables(data_dir, products, impressions, "parquet")

    report = validate_data(data_dir, tmp_path / "out", ValidateConfig())
    assert report.products_kept == 20 and report.reasons == {}


def test_duplicate_impressions_are_counted_and_quarantined(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    doubled = pd.concat([impressions, impressions.iloc[10:15]], ignore_index=True)
    # Same search, product and position but another click: not a duplicate.
    doubled.loc[len(doubled)] = {
        **impressions.iloc[20].to_dict(),
        "clicked": 1 - impressions.iloc[20]["clicked"],
    }
    write_tables(data_dir, products, doubled, "csv")

    report = validate_data(data_dir, tmp_path / "out", LENIENT)

    quarantine = _outputs(tmp_path / "out")[2]
    assert report.reasons == {"impressions/duplicate_impression": 5}
    assert quarantine["row"].tolist() == [100, 101, 102, 103, 104]
    assert report.impressions_kept == 101


@pytest.mark.parametrize(
    ("table", "line", "edit", "fields"),
    [
        ("products", 4, lambda text: text.replace("model", "model, red", 1), 5),  # unquoted comma
        ("products", 7, lambda text: text + ",extra", 5),
        ("impressions", 12, lambda text: text.rsplit(",", 1)[0], 5),  # a field short
        ("impressions", 30, lambda text: '"' + text, 1),  # an unclosed quote swallows the rest
    ],
)
def test_malformed_csv_lines_refuse_the_file_naming_the_line(
    data_dir, tmp_path, table, line, edit, fields
):
    products, impressions = clean_tables(data_dir)
    paths = dict(
        zip(
            ("products", "impressions"),
            write_tables(data_dir, products, impressions, "csv"),
            strict=True,
        )
    )
    lines = paths[table].read_text().splitlines()
    lines[line - 1] = edit(lines[line - 1])
    paths[table].write_text("\n".join(lines) + "\n")
    header = len(lines[0].split(","))

    with pytest.raises(DataError) as caught:
        validate_data(data_dir, tmp_path / "out", ValidateConfig())
    assert str(caught.value) == (
        f"{paths[table]}: not a readable CSV file (line {line if fields != 1 else len(lines)} has "
        f"{fields} field{'s' if fields != 1 else ''}, the header {header}: an unquoted comma or "
        "quote?)"
    )


@pytest.mark.parametrize(
    ("empty", "fmt"),
    [("products", "parquet"), ("impressions", "csv"), ("both", "csv"), ("both", "parquet")],
)
def test_empty_tables_are_refused(data_dir, tmp_path, empty, fmt):
    products, impressions = clean_tables(data_dir)
    if empty in ("products", "both"):
        products = products.head(0)
    if empty in ("impressions", "both"):
        impressions = impressions.head(0)
    write_tables(data_dir, products, impressions, fmt)
    first = "products" if empty != "impressions" else "impressions"

    with pytest.raises(DataError) as caught:
        validate_data(data_dir, tmp_path / "out", ValidateConfig())
    assert str(caught.value) == (
        f"{data_dir / f'{first}.{fmt}'}: no rows: an empty {first} table leaves nothing to train on"
    )


def test_nothing_left_after_validation_fails_even_without_a_share_limit(data_dir, tmp_path):
    products, impressions = clean_tables(data_dir)
    write_tables(data_dir, products, impressions.assign(clicked=3), "parquet")

    with pytest.raises(DataError) as caught:
        validate_data(data_dir, tmp_path / "out", ValidateConfig(max_quarantine_share=1.0))
    assert str(caught.value) == (
        f"{data_dir / 'impressions.parquet'}: every row quarantined (100 clicked_not_binary): "
        "nothing left to train on"
    )
    assert len(pd.read_parquet(tmp_path / "out" / "quarantine.parquet")) == 100
