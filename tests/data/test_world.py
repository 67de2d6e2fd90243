"""The synthetic shop world: determinism, configured shares, image truth, queries and clicks."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from components.config import ConfigError, SynthConfig, load_params
from components.data.contract import IMPRESSION_COLUMNS, PRODUCT_COLUMNS
from components.data.world import WorldSummary, generate_world, vocab
from components.data.world.catalog import sample_catalog
from components.data.world.clicks import build_pools, simulate_day
from components.data.world.images import RenderSettings, draw_product
from components.data.world.text import make_queries
from tests.conftest import ROOT


def _share_tolerance(p: float, n: int) -> float:
    """Four binomial standard errors, plus a little slack for tiny samples."""
    return 4 * math.sqrt(p * (1 - p) / n) + 0.01


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def cfg() -> SynthConfig:
    synth = load_params(ROOT / "params.yaml").synth
    return synth.model_copy(update={"scale": "tiny", "workers": 2})


@pytest.fixture(scope="module")
def world(cfg: SynthConfig, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WorldSummary]:
    out = tmp_path_factory.mktemp("world")
    return out, generate_world(cfg, out, progress=False)


@pytest.fixture(scope="module")
def data(world: tuple[Path, WorldSummary]) -> dict[str, pd.DataFrame]:
    out = world[0]
    return {
        "products": pd.read_parquet(out / "products.parquet"),
        "impressions": pd.read_parquet(out / "impressions.parquet"),
        "truth_products": pd.read_parquet(out / "truth" / "products.parquet"),
        "truth_queries": pd.read_parquet(out / "truth" / "queries.parquet"),
    }


@pytest.fixture(scope="module")
def graded(data: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Impressions with their true relevance grade (2 full, 1 same category, 0 neither),
    computed here from the truth tables, independently of the generator's code."""
    tq = data["truth_queries"][["query", "category", "color", "pattern"]]
    tp = data["truth_products"][["product_id", "category", "color", "pattern"]]
    m = data["impressions"].merge(tq, on="query").merge(tp, on="product_id", suffixes=("_q", ""))
    assert len(m) == len(data["impressions"])
    cat_ok = m.category_q.isna() | (m.category_q == m.category)
    full = cat_ok & (m.color_q.isna() | (m.color_q == m.color))
    full &= m.pattern_q.isna() | (m.pattern_q == m.pattern)
    partial = m.category_q.notna() & cat_ok & ~full
    return m.assign(grade=np.where(full, 2, np.where(partial, 1, 0)))


# ----------------------------------------------------------------------------------- determinism


def test_same_config_same_bytes_whatever_the_worker_count(cfg, world, tmp_path):
    out, summary = world
    again = generate_world(cfg.model_copy(update={"workers": 1}), tmp_path, progress=False)
    first = _hashes(out)
    assert len(first) == summary.n_products + 5  # images + 2 tables + 2 truth tables + world.json
    assert _hashes(tmp_path) == first
    assert again.n_clicks == summary.n_clicks


def test_different_seed_gives_a_different_world(cfg, world, tmp_path):
    out, _ = world
    generate_world(cfg.model_copy(update={"seed": cfg.seed + 1}), tmp_path, progress=False)
    first, other = _hashes(out), _hashes(tmp_path)
    for name in ("products.parquet", "impressions.parquet", "truth/queries.parquet"):
        assert first[name] != other[name]
    images = [k for k in first if k.startswith("images/")]
    assert sum(first[k] != other[k] for k in images) > 0.99 * len(images)


def test_regenerating_a_smaller_world_removes_orphan_images(cfg, tmp_path):
    small = cfg.model_copy(
        update={
            "workers": 1,
            "scales": {
                "tiny": cfg.size.model_copy(
                    update={"n_products": 20, "n_queries": 30, "searches_per_day": 10}
                )
            },
        }
    )
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "p999999.jpg").write_bytes(b"stale")
    generate_world(small, tmp_path, progress=False)
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 20


def test_days_are_independent_so_the_log_can_be_extended(cfg, data):
    """A day's log depends only on (seed, day) and the static world, not on how many days exist."""
    catalog = sample_catalog(cfg)
    queries = make_queries(cfg, catalog.categories)
    pools = build_pools(catalog, queries)
    longer = cfg.model_copy(update={"scales": {"tiny": cfg.size.model_copy(update={"days": 9})}})
    day = cfg.size.days - 1
    log = simulate_day(cfg, catalog, queries, pools, day)
    later = simulate_day(longer, catalog, queries, pools, day)
    assert np.array_equal(log.product, later.product)
    assert np.array_equal(log.clicked, later.clicked)
    written = data["impressions"][data["impressions"].day == day]
    assert written.product_id.tolist() == [catalog.product_ids[i] for i in log.product.ravel()]


# --------------------------------------------------------------------------------- contract, meta


def test_tables_follow_the_data_contract(world, data):
    out, summary = world
    for table, columns in (("products", PRODUCT_COLUMNS), ("impressions", IMPRESSION_COLUMNS)):
        frame = data[table]
        assert list(frame.columns) == list(columns)
        for name, kind in columns.items():
            if kind == "int64":
                assert frame[name].dtype == np.int64, name
            else:
                assert frame[name].map(type).eq(str).all(), name
    products = data["products"]
    assert products.product_id.is_unique
    assert all((out / p).is_file() for p in products.image_path)
    assert len(products) == summary.n_products == len(data["truth_products"])
    assert len(data["impressions"]) == summary.n_impressions
    assert data["impressions"].clicked.sum() == summary.n_clicks


def test_manifest_describes_the_world_without_timestamps(cfg, world):
    out, summary = world
    manifest = json.loads((out / "world.json").read_text())
    assert manifest["seed"] == cfg.seed and manifest["scale"] == "tiny"
    assert manifest["synth"]["title_omit_share"] == cfg.title_omit_share
    assert manifest["counts"]["impressions"] == summary.n_impressions
    assert manifest["days"] == cfg.size.days
    assert manifest["test_days"] == list(summary.test_day_indices)
    assert manifest["generator_version"]


def test_config_errors_name_the_field(cfg, tmp_path):
    with pytest.raises(ConfigError, match="n_categories"):
        sample_catalog(cfg.model_copy(update={"n_categories": len(vocab.CATEGORIES) + 1}))
    with pytest.raises(ConfigError, match="impressions_per_search"):
        generate_world(cfg.model_copy(update={"impressions_per_search": 10_000}), tmp_path)


# ------------------------------------------------------------------------------------ catalog


def test_at_least_twenty_categories_each_with_products(cfg, data):
    categories = data["products"].category.value_counts()
    assert len(categories) == cfg.n_categories >= 20
    assert categories.min() >= 5


def test_title_states_match_configured_shares(cfg, data):
    states = data["truth_products"].title_state
    n = len(states)
    for state, share in (
        ("omitted", cfg.title_omit_share),
        ("misstated", cfg.title_misstate_share),
    ):
        assert abs((states == state).mean() - share) <= _share_tolerance(share, n), state


def test_hidden_attributes_are_only_in_the_image(data):
    """Omitted/misstated titles never name the true colour; correct ones always do."""
    merged = data["products"].merge(data["truth_products"], on="product_id")
    names = {c.name: set(vocab.colour_words(c)) for c in vocab.COLOURS}
    for row in merged.itertuples():
        words = set(_words(row.title))
        if row.title_state == "correct":
            assert words & names[row.color], row.title
            assert row.title_color == row.color and row.title_pattern == row.pattern
        else:
            assert not words & names[row.color], row.title
            assert row.title_color != row.color
    misstated = merged[merged.title_state == "misstated"]
    assert (misstated.title_color == vocab.MULTICOLOR).any()
    assert (misstated.title_color != vocab.MULTICOLOR).any()


def test_vocabulary_lists_do_not_share_words():
    """Otherwise a title could state a colour or pattern by accident (a brand named 'Rose')."""
    colour = {w for c in vocab.COLOURS for w in vocab.colour_words(c)}
    pattern = {w for p in vocab.PATTERNS for w in vocab.pattern_words(p)}
    category = {w for c in vocab.CATEGORIES for w in _words(" ".join(vocab.category_words(c)))}
    other = set(
        _words(
            " ".join(
                [
                    *vocab.BRANDS,
                    *vocab.STYLES,
                    *vocab.MARKETING,
                    *vocab.OMIT_PHRASES,
                    *(w for group in vocab.MATERIALS.values() for w in group),
                    *(w for group in vocab.SIZE_RUNS.values() for w in group),
                    *(w for group in vocab.AUDIENCES.values() for w in group),
                ]
            )
        )
    )
    for a, b in (
        (colour, pattern),
        (colour, category),
        (colour, other),
        (pattern, category),
        (pattern, other),
        (category, other),
    ):
        assert not a & b
    canonical = {c.name for c in vocab.CATEGORIES}
    assert not canonical & {s for c in vocab.CATEGORIES for s in c.synonyms}


# ------------------------------------------------------------------------------------- images


def test_images_decode_at_their_recorded_size(cfg, world, data):
    out, _ = world
    images = [v for k, v in _hashes(out).items() if k.startswith("images/")]
    assert len(set(images)) == len(images) == len(data["products"])  # one stream per product
    truth = data["truth_products"].set_index("product_id")
    for row in data["products"].itertuples():
        image = cv2.imread(str(out / row.image_path))
        assert image is not None, row.image_path
        h, w = image.shape[:2]
        assert (w, h) == tuple(truth.loc[row.product_id, ["canvas_w", "canvas_h"]])
        assert cfg.canvas_min <= min(w, h) and max(w, h) <= cfg.canvas_max


def test_objects_fill_the_configured_part_of_the_canvas(cfg, data):
    t = data["truth_products"]
    fill = (t.bbox_x1 - t.bbox_x0) * (t.bbox_y1 - t.bbox_y0) / (t.canvas_w * t.canvas_h)
    assert fill.between(cfg.object_fill_min, cfg.object_fill_max).all()
    assert fill.max() - fill.min() > 0.5 * (cfg.object_fill_max - cfg.object_fill_min)
    assert ((t.bbox_x0 >= 0) & (t.bbox_x1 <= t.canvas_w)).all()
    assert ((t.bbox_y0 >= 0) & (t.bbox_y1 <= t.canvas_h)).all()


def test_truth_box_is_the_tight_box_of_the_drawn_object(cfg, world, data):
    out, _ = world
    settings = RenderSettings.from_config(cfg)
    colour_index = {c.name: i for i, c in enumerate(vocab.COLOURS)}
    pattern_index = {p.name: i for i, p in enumerate(vocab.PATTERNS)}
    aspect = {c.name: c.aspect for c in vocab.CATEGORIES}
    truth = data["truth_products"]
    for index in range(0, len(truth), 7):
        row = truth.iloc[index]
        drawn = draw_product(
            settings,
            index,
            row.category,
            aspect[row.category],
            colour_index[row.color],
            pattern_index[row.pattern],
        )
        x0, y0, x1, y1 = row.bbox_x0, row.bbox_y0, row.bbox_x1, row.bbox_y1
        inside = drawn.mask[y0:y1, x0:x1]
        assert drawn.mask.sum() == inside.sum() > 0  # nothing of the object outside the box
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        jpeg = cv2.imread(str(out / "images" / f"{row.product_id}.jpg"))[..., ::-1]
        mse = np.mean((jpeg.astype(float) - drawn.image) ** 2)
        assert 10 * np.log10(255**2 / mse) > 28  # the file is this drawing, up to JPEG loss
        if row.pattern == "solid" and row.distractor is None:
            # The object's pixels carry its true colour (what titles may hide).
            core = cv2.erode(drawn.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            mean = jpeg[core].mean(axis=0)
            assert np.abs(mean - vocab.COLOURS[colour_index[row.color]].rgb).max() < 40


def test_distractors_follow_their_share_and_avoid_the_object(cfg, data):
    t = data["truth_products"]
    has = t.distractor.notna()
    assert abs(has.mean() - cfg.distractor_share) <= _share_tolerance(cfg.distractor_share, len(t))
    assert set(t.distractor.dropna()) == {"logo", "price_tag", "watermark"}
    d = t[has]
    dx = np.minimum(d.bbox_x1, d.distractor_x1) - np.maximum(d.bbox_x0, d.distractor_x0)
    dy = np.minimum(d.bbox_y1, d.distractor_y1) - np.maximum(d.bbox_y0, d.distractor_y0)
    area = (d.distractor_x1 - d.distractor_x0) * (d.distractor_y1 - d.distractor_y0)
    overlap = dx.clip(lower=0) * dy.clip(lower=0) / area
    assert (overlap <= 0.2).mean() >= 0.95
    assert overlap.median() == 0


# ------------------------------------------------------------------------------------ queries


def test_queries_are_distinct_and_one_to_four_words(cfg, data):
    q = data["truth_queries"]
    assert len(q) == cfg.size.n_queries and q["query"].is_unique
    n_words = q["query"].str.split().str.len()
    assert n_words.between(1, 4).all() and n_words.nunique() == 4
    one = q[n_words == 1]
    assert (one.category.isna() ^ one.color.isna()).all()  # exactly one of category or colour
    assert (one.pattern.isna() & one.modifier.isna()).all()


def test_query_noise_matches_configured_shares(cfg, data):
    q = data["truth_queries"]
    canonical_words = {c.name for c in vocab.CATEGORIES} | {c.name for c in vocab.COLOURS}
    canonical_words |= {p.name for p in vocab.PATTERNS} | set(q.modifier.dropna())
    synonyms = {
        s
        for group in (vocab.CATEGORIES, vocab.COLOURS, vocab.PATTERNS)
        for item in group
        for s in item.synonyms
    }
    for flag, share in (
        ("synonym", cfg.query_synonym_share),
        ("typo", cfg.query_typo_share),
        ("shuffled", cfg.query_shuffle_share),
    ):
        assert abs(q[flag].mean() - share) <= _share_tolerance(share, len(q)), flag

    words = q["query"].str.split()
    known = words.map(lambda ws: all(w in canonical_words | synonyms for w in ws))
    assert known[~q.typo].all()
    assert (~known[q.typo]).mean() >= 0.9  # a typo may, rarely, spell another real word
    clean = ~q.typo & ~q.synonym
    assert words[clean].map(sorted).equals(q.canonical[clean].str.split().map(sorted))
    in_order = words.str.join(" ") == q.canonical
    assert not in_order[clean & q.shuffled].any() and in_order[clean & ~q.shuffled].all()
    assert words[q.synonym & ~q.typo].map(lambda ws: bool(set(ws) & synonyms)).all()


def test_query_popularity_is_zipf_like(cfg, data):
    searches = data["impressions"].drop_duplicates("search_id")
    ranks = data["truth_queries"].set_index("query").popularity_rank
    counts = searches["query"].value_counts().reindex(ranks.index, fill_value=0)
    assert counts.max() >= 20 * max(counts.median(), 1)
    top = counts.groupby(ranks).sum().loc[1:20]
    slope = np.polyfit(np.log(top.index), np.log(top.clip(lower=1)), 1)[0]
    assert abs(slope + cfg.zipf_exponent) < 0.3


# ------------------------------------------------------------------------------------- clicks


def test_every_search_shows_a_full_ranked_list(cfg, data):
    imp = data["impressions"]
    n = cfg.impressions_per_search
    per = imp.groupby("search_id").agg(
        rows=("position", "size"),
        lo=("position", "min"),
        hi=("position", "max"),
        positions=("position", "nunique"),
        products=("product_id", "nunique"),
        queries=("query", "nunique"),
        days=("day", "nunique"),
    )
    assert (per.rows == n).all() and (per.positions == n).all()
    assert (per.lo == 1).all() and (per.hi == n).all() and (per.products == n).all()
    assert (per.queries == 1).all() and (per.days == 1).all()
    searches_per_day = imp.groupby("day").search_id.nunique()
    assert searches_per_day.index.tolist() == list(range(cfg.size.days))
    assert (searches_per_day == cfg.size.searches_per_day).all()


def test_test_days_are_the_last_days(cfg, world):
    summary = world[1]
    assert summary.test_days == cfg.size.test_days
    assert summary.test_day_indices == tuple(
        range(cfg.size.days - summary.test_days, cfg.size.days)
    )


def test_candidates_mix_relevant_partial_and_random(graded):
    shares = graded.grade.value_counts(normalize=True)
    assert shares.min() > 0.1 and len(shares) == 3


def test_clicks_follow_true_relevance(cfg, graded):
    ctr = graded.groupby("grade").clicked.mean()
    assert ctr[2] > 4 * ctr[0] and ctr[2] > 1.5 * ctr[1] > ctr[0]
    assert 0 < ctr[0] < cfg.click_noise  # noise clicks exist, damped by position bias


def test_ctr_falls_with_position_at_equal_relevance(graded):
    relevant = graded[graded.grade == 2]
    bands = pd.cut(relevant.position, [0, 1, 3, 6, 10])
    by_band = relevant.groupby(bands, observed=True).clicked.mean()
    assert by_band.is_monotonic_decreasing and by_band.iloc[0] > 3 * by_band.iloc[-1]


def test_test_day_queries_have_clicks_and_non_clicks(world, data):
    imp = data["impressions"]
    test = imp[imp.day.isin(world[1].test_day_indices)]
    per_query = test.groupby("query").clicked.agg(["sum", "size"])
    mixed = (per_query["sum"] > 0) & (per_query["sum"] < per_query["size"])
    assert mixed.mean() > 0.3  # GAUC needs queries with both
