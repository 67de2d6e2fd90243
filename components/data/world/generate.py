"""Generate the whole synthetic shop world into a data directory that follows the data contract."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from components.config import ConfigError, SynthConfig
from components.data.contract import IMAGES_DIR, IMPRESSIONS, PRODUCTS, TRUTH_DIR, WORLD_MANIFEST
from components.data.world.catalog import TITLE_STATES, Catalog, sample_catalog
from components.data.world.clicks import DayLog, build_pools, simulate_day
from components.data.world.images import ImageTruth, draw_images
from components.data.world.text import QuerySet, Title, make_queries, make_titles
from components.data.world.vocab import COLOURS, PATTERNS, Category

# Bump whenever the same config would produce different bytes.
GENERATOR_VERSION = "1.0.0"
QUERIES = "queries.parquet"  # truth/: every query with what it names and its popularity


@dataclass(frozen=True)
class WorldSummary:
    n_products: int
    n_queries: int
    n_searches: int
    n_impressions: int
    n_clicks: int
    days: int
    test_days: int  # how many of the last days are the test period (as in ScaleConfig)
    test_day_indices: tuple[int, ...]
    seconds: float
    products_per_second: float  # image drawing throughput, the dominant cost
    impressions_per_second: float  # click-log simulation throughput
    image_seconds: float
    click_seconds: float
    bytes_written: int


def search_id(day: int, index: int) -> str:
    """Unique across days, so days appended later never collide with earlier ones."""
    return f"d{day:04d}-s{index:06d}"


def _write(columns: dict[str, pa.Array | list | np.ndarray], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def product_columns(catalog: Catalog, titles: list[Title]) -> dict[str, pa.Array]:
    return {
        "product_id": pa.array(catalog.product_ids, pa.string()),
        "title": pa.array([t.text for t in titles], pa.string()),
        "category": pa.array([catalog.categories[c].name for c in catalog.category], pa.string()),
        "image_path": pa.array([f"{IMAGES_DIR}/{p}.jpg" for p in catalog.product_ids], pa.string()),
    }


def impression_columns(
    logs: list[DayLog], catalog: Catalog, queries: QuerySet
) -> dict[str, pa.Array | np.ndarray]:
    ids = np.asarray(catalog.product_ids, dtype=object)
    texts = np.asarray(queries.text, dtype=object)
    n = logs[0].product.shape[1]
    sid, query, product, position, clicked, day = [], [], [], [], [], []
    for log in logs:
        searches = len(log.query)
        sid.append(np.repeat(np.array([search_id(log.day, i) for i in range(searches)]), n))
        query.append(np.repeat(texts[log.query], n))
        product.append(ids[log.product.ravel()])
        position.append(np.tile(np.arange(1, n + 1, dtype=np.int64), searches))
        clicked.append(log.clicked.ravel().astype(np.int64))
        day.append(np.full(searches * n, log.day, dtype=np.int64))
    return {
        "search_id": pa.array(np.concatenate(sid), pa.string()),
        "query": pa.array(np.concatenate(query), pa.string()),
        "product_id": pa.array(np.concatenate(product), pa.string()),
        "position": np.concatenate(position),
        "clicked": np.concatenate(clicked),
        "day": np.concatenate(day),
    }


def truth_product_columns(
    catalog: Catalog, titles: list[Title], images: list[ImageTruth]
) -> dict[str, pa.Array | list | np.ndarray]:
    """Hidden truth per product: true attributes, what the title claims, where things are drawn."""
    boxes = np.array([t.bbox for t in images], dtype=np.int64).reshape(-1, 4)
    dboxes = [t.distractor_box or (None,) * 4 for t in images]
    product_cols: dict[str, pa.Array | list | np.ndarray] = {
        "product_id": pa.array(catalog.product_ids, pa.string()),
        "category": [catalog.categories[c].name for c in catalog.category],
        "color": [COLOURS[c].name for c in catalog.colour],
        "pattern": [PATTERNS[p].name for p in catalog.pattern],
        "title_state": [TITLE_STATES[s] for s in catalog.title_state],
        "title_color": pa.array([t.colour for t in titles], pa.string()),
        "title_pattern": pa.array([t.pattern for t in titles], pa.string()),
    }
    for k, name in enumerate(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")):
        product_cols[name] = boxes[:, k]
    product_cols["canvas_w"] = np.array([t.canvas_w for t in images], dtype=np.int64)
    product_cols["canvas_h"] = np.array([t.canvas_h for t in images], dtype=np.int64)
    product_cols["distractor"] = pa.array([t.distractor for t in images], pa.string())
    for k, name in enumerate(("distractor_x0", "distractor_y0", "distractor_x1", "distractor_y1")):
        product_cols[name] = pa.array([b[k] for b in dboxes], pa.int64())
    return product_cols


def truth_query_columns(
    queries: QuerySet, categories: tuple[Category, ...]
) -> dict[str, pa.Array | list | np.ndarray]:
    """Hidden truth per query: what it names, its noise, and its share of the searches."""

    def named(idx: np.ndarray, names: list[str]) -> pa.Array:
        return pa.array([names[i] if i >= 0 else None for i in idx], pa.string())

    return {
        "query": pa.array(queries.text, pa.string()),
        "category": named(queries.category, [c.name for c in categories]),
        "color": named(queries.colour, [c.name for c in COLOURS]),
        "pattern": named(queries.pattern, [p.name for p in PATTERNS]),
        "modifier": pa.array(queries.modifier, pa.string()),
        "canonical": pa.array(queries.canonical, pa.string()),
        "popularity_rank": np.arange(1, len(queries) + 1, dtype=np.int64),
        "popularity": queries.popularity,
        "n_words": np.array([len(q.split()) for q in queries.text], dtype=np.int64),
        "synonym": queries.synonym,
        "typo": queries.typo,
        "shuffled": queries.shuffled,
    }


def _remove_stale_images(images_dir: Path, keep: set[str]) -> None:
    """A smaller world written over a bigger one must not leave orphan images behind."""
    for path in images_dir.glob("*.jpg"):
        if path.name not in keep:
            path.unlink()


def _directory_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def generate_world(cfg: SynthConfig, out_dir: Path, progress: bool = True) -> WorldSummary:
    """Write products, impressions, images, world.json and truth/ for `cfg` into `out_dir`.

    The same config always gives the same bytes in every file, whatever `cfg.workers` is.
    """
    if cfg.impressions_per_search > cfg.size.n_products:
        raise ConfigError(
            f"synth.impressions_per_search ({cfg.impressions_per_search}) exceeds the "
            f"{cfg.size.n_products} products of scale {cfg.scale!r}"
        )
    start = time.perf_counter()
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)

    catalog = sample_catalog(cfg)
    titles = make_titles(catalog, cfg.seed)
    queries = make_queries(cfg, catalog.categories)

    names = [f"{p}.jpg" for p in catalog.product_ids]
    _remove_stale_images(images_dir, set(names))
    t_images = time.perf_counter()
    image_truth = draw_images(cfg, catalog, [images_dir / n for n in names], progress)
    image_seconds = time.perf_counter() - t_images

    t_clicks = time.perf_counter()
    pools = build_pools(catalog, queries)
    days = range(cfg.size.days)
    logs = [
        simulate_day(cfg, catalog, queries, pools, day)
        for day in tqdm(days, desc="click log", unit="day", disable=not progress)
    ]
    click_seconds = time.perf_counter() - t_clicks

    _write(product_columns(catalog, titles), out_dir / f"{PRODUCTS}.parquet")
    _write(impression_columns(logs, catalog, queries), out_dir / f"{IMPRESSIONS}.parquet")
    truth_products = truth_product_columns(catalog, titles, image_truth)
    _write(truth_products, out_dir / TRUTH_DIR / f"{PRODUCTS}.parquet")
    _write(
        truth_query_columns(queries, catalog.categories), out_dir / TRUTH_DIR / "queries.parquet"
    )

    test_day_indices = tuple(days[-cfg.size.test_days :])
    n_searches = sum(len(log.query) for log in logs)
    n_impressions = sum(log.product.size for log in logs)
    n_clicks = int(sum(log.clicked.sum() for log in logs))
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "scale": cfg.scale,
        # workers is how, not what: it must not change a byte of the world
        "synth": cfg.model_dump(mode="json", exclude={"workers"}),
        "counts": {
            "products": len(catalog),
            "queries": len(queries),
            "searches": n_searches,
            "impressions": n_impressions,
            "clicks": n_clicks,
        },
        "days": cfg.size.days,
        "test_days": list(test_day_indices),
        "categories": [c.name for c in catalog.categories],
        "colors": [c.name for c in COLOURS],
        "patterns": [p.name for p in PATTERNS],
    }
    (out_dir / WORLD_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    seconds = time.perf_counter() - start
    return WorldSummary(
        n_products=len(catalog),
        n_queries=len(queries),
        n_searches=n_searches,
        n_impressions=n_impressions,
        n_clicks=n_clicks,
        days=cfg.size.days,
        test_days=cfg.size.test_days,
        test_day_indices=test_day_indices,
        seconds=seconds,
        products_per_second=len(catalog) / max(image_seconds, 1e-9),
        impressions_per_second=n_impressions / max(click_seconds, 1e-9),
        image_seconds=image_seconds,
        click_seconds=click_seconds,
        bytes_written=_directory_bytes(out_dir),
    )
