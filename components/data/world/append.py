"""Append further days to an existing world, optionally drifted: the new data a retrain sees.

The world's current state is read back from what it wrote: the catalogue and every query's true
attributes and popularity from truth/, the shoppers' click behaviour from world.json. Drift kinds
(params.yaml `append.drift`, any combination) change that state before the new days are drawn,
and the change persists in later appends, as real shifts do:

- season: queries naming the seasonal palette (colours, pattern) become `season_boost` x as
  popular, and new products in that palette join the catalogue;
- new_category: products of a category the world did not sell arrive, with new queries naming
  it that take `new_query_share` of the searches (words the champion's vocabulary never saw);
- query_mix: queries of `query_mix_categories` categories become `query_mix_boost` x as popular;
- clicks: shoppers look less far down the list (`position_bias_power`) and click irrelevant
  products more (`click_noise`).

Old rows are kept as they were (tables are rewritten with the new rows after them), every new
product and day comes from its own random stream, and search ids carry the day, so nothing
collides. Appending makes a new data version once `dvc add data` records it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from components.config import AppendConfig, ConfigError, SynthConfig
from components.data.contract import IMAGES_DIR, IMPRESSIONS, PRODUCTS, TRUTH_DIR, WORLD_MANIFEST
from components.data.world.catalog import TITLE_STATES, Catalog, product_id
from components.data.world.clicks import build_pools, simulate_day
from components.data.world.generate import (
    GENERATOR_VERSION,
    QUERIES,
    impression_columns,
    product_columns,
    truth_product_columns,
    truth_query_columns,
)
from components.data.world.images import draw_images
from components.data.world.seeding import Purpose, rng_for
from components.data.world.text import QuerySet, make_queries, make_title, zipf_popularity
from components.data.world.vocab import CATEGORIES, COLOURS, PATTERNS, Category, frequencies
from components.errors import DataError


@dataclass(frozen=True)
class AppendSummary:
    first_day: int
    days: int
    drift: tuple[str, ...]
    new_products: int
    new_queries: int
    n_impressions: int
    seconds: float


@dataclass(frozen=True)
class _State:
    synth: SynthConfig
    catalog: Catalog
    queries: QuerySet
    days: int
    behaviour: dict[str, float]


def _index_of(names: list[str | None], vocabulary: list[str]) -> np.ndarray:
    position = {name: i for i, name in enumerate(vocabulary)}
    return np.array([-1 if n is None else position[n] for n in names], dtype=np.int64)


def _read_state(data_dir: Path) -> tuple[_State, dict]:
    manifest_file = data_dir / WORLD_MANIFEST
    if not manifest_file.exists():
        raise DataError(f"{manifest_file}: not a generated world (only those can be appended to)")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    if manifest.get("generator_version") != GENERATOR_VERSION:
        raise DataError(
            f"{manifest_file}: generator_version {manifest.get('generator_version')!r}, this "
            f"code appends to {GENERATOR_VERSION!r} worlds only"
        )
    synth = SynthConfig.model_validate(manifest["synth"])
    by_name = {c.name: c for c in CATEGORIES}
    categories = tuple(by_name[name] for name in manifest["categories"])
    truth = pd.read_parquet(data_dir / TRUTH_DIR / f"{PRODUCTS}.parquet")
    catalog = Catalog(
        product_ids=tuple(truth["product_id"]),
        categories=categories,
        category=_index_of(list(truth["category"]), [c.name for c in categories]),
        colour=_index_of(list(truth["color"]), [c.name for c in COLOURS]),
        pattern=_index_of(list(truth["pattern"]), [p.name for p in PATTERNS]),
        title_state=_index_of(list(truth["title_state"]), list(TITLE_STATES)),
    )
    q = pd.read_parquet(data_dir / TRUTH_DIR / QUERIES)
    nullable = q.astype(object).where(q.notna(), None)
    queries = QuerySet(
        text=tuple(q["query"]),
        canonical=tuple(q["canonical"]),
        category=_index_of(list(nullable["category"]), [c.name for c in categories]),
        colour=_index_of(list(nullable["color"]), [c.name for c in COLOURS]),
        pattern=_index_of(list(nullable["pattern"]), [p.name for p in PATTERNS]),
        modifier=tuple(nullable["modifier"]),
        synonym=q["synonym"].to_numpy(bool),
        typo=q["typo"].to_numpy(bool),
        shuffled=q["shuffled"].to_numpy(bool),
        popularity=q["popularity"].to_numpy(np.float64),
    )
    behaviour = manifest.get(
        "behaviour",
        {"position_bias_power": synth.position_bias_power, "click_noise": synth.click_noise},
    )
    return _State(synth, catalog, queries, int(manifest["days"]), behaviour), manifest


def _boost(popularity: np.ndarray, chosen: np.ndarray, factor: float) -> np.ndarray:
    weights = popularity * np.where(chosen, factor, 1.0)
    return weights / weights.sum()


def _new_catalog(
    state: _State,
    categories: tuple[Category, ...],
    category: np.ndarray,
    rng: np.random.Generator,
    first_index: int,
) -> Catalog:
    """New products numbered from `first_index`, with drawn colour, pattern and title state."""
    n_new = len(category)
    synth = state.synth
    omit, misstate = synth.title_omit_share, synth.title_misstate_share
    states_p = np.clip([1 - omit - misstate, omit, misstate], 0, None)
    width_hint = synth.size.n_products  # keeps ids the same width as the world's first ones
    ids = tuple(product_id(i, width_hint) for i in range(first_index, first_index + n_new))
    colour = rng.choice(len(COLOURS), size=n_new, p=frequencies(COLOURS))
    pattern = rng.choice(len(PATTERNS), size=n_new, p=frequencies(PATTERNS))
    title_state = rng.choice(3, size=n_new, p=states_p / states_p.sum())
    return Catalog(ids, categories, category, colour, pattern, title_state)


def _merge_catalog(old: Catalog, new: Catalog) -> Catalog:
    return Catalog(
        product_ids=old.product_ids + new.product_ids,
        categories=new.categories,
        category=np.concatenate([old.category, new.category]),
        colour=np.concatenate([old.colour, new.colour]),
        pattern=np.concatenate([old.pattern, new.pattern]),
        title_state=np.concatenate([old.title_state, new.title_state]),
    )


def _merge_queries(old: QuerySet, new: QuerySet) -> QuerySet:
    return QuerySet(
        text=old.text + new.text,
        canonical=old.canonical + new.canonical,
        category=np.concatenate([old.category, new.category]),
        colour=np.concatenate([old.colour, new.colour]),
        pattern=np.concatenate([old.pattern, new.pattern]),
        modifier=old.modifier + new.modifier,
        synonym=np.concatenate([old.synonym, new.synonym]),
        typo=np.concatenate([old.typo, new.typo]),
        shuffled=np.concatenate([old.shuffled, new.shuffled]),
        popularity=np.concatenate([old.popularity, new.popularity]),
    )


def _new_category_queries(state: _State, cfg: AppendConfig, category: Category) -> QuerySet:
    """Queries that name the new category, drawn like the world's, none repeating an old one."""
    wanted = max(1, round(cfg.new_query_count * state.synth.size.n_queries))
    size = state.synth.size.model_copy(update={"n_queries": 4 * wanted})
    drawn_cfg = state.synth.model_copy(
        update={"seed": state.synth.seed + 7919 * (state.days + 1), "scales": {"x": size}}
    ).model_copy(update={"scale": "x"})
    drawn = make_queries(drawn_cfg, (category,))
    old = set(state.queries.text)
    keep = [i for i in range(len(drawn)) if drawn.category[i] == 0 and drawn.text[i] not in old]
    keep = np.array(keep[:wanted], dtype=np.int64)
    if not len(keep):
        raise ConfigError(f"append: no new query names the category {category.name!r}")
    new_index = len(state.catalog.categories)  # the category's index once it is appended
    return QuerySet(
        text=tuple(drawn.text[i] for i in keep),
        canonical=tuple(drawn.canonical[i] for i in keep),
        category=np.full(len(keep), new_index, dtype=np.int64),
        colour=drawn.colour[keep],
        pattern=drawn.pattern[keep],
        modifier=tuple(drawn.modifier[i] for i in keep),
        synonym=drawn.synonym[keep],
        typo=drawn.typo[keep],
        shuffled=drawn.shuffled[keep],
        popularity=zipf_popularity(len(keep), state.synth.zipf_exponent),
    )


def _drift(state: _State, cfg: AppendConfig, seed: int) -> tuple[_State, Catalog | None]:
    """The state after `cfg.drift`, and the products it adds (None when it adds none)."""
    rng = rng_for(seed, Purpose.DRIFT, state.days)
    catalog, queries, behaviour = state.catalog, state.queries, dict(state.behaviour)
    n_new = max(1, round(cfg.new_product_share * state.synth.size.n_products))
    added: Catalog | None = None
    if "new_category" in cfg.drift:
        used = {c.name for c in catalog.categories}
        category = next((c for c in CATEGORIES if c.name == cfg.new_category), None)
        if category is None or category.name in used:
            unused = [c.name for c in CATEGORIES if c.name not in used]
            raise ConfigError(
                f"append.new_category {cfg.new_category!r}: pick one the world does not sell "
                f"yet ({', '.join(unused) or 'none left'})"
            )
        new_queries = _new_category_queries(state, cfg, category)
        categories = (*catalog.categories, category)
        codes = np.full(n_new, len(categories) - 1, dtype=np.int64)
        added = _new_catalog(state, categories, codes, rng, len(state.catalog))
        share = cfg.new_query_share
        new_queries = replace(new_queries, popularity=new_queries.popularity * share)
        queries = _merge_queries(
            replace(queries, popularity=queries.popularity * (1 - share)), new_queries
        )
        catalog = replace(catalog, categories=categories)
    if "season" in cfg.drift:
        names = [c.name for c in COLOURS]
        missing = [c for c in cfg.season_colours if c not in names]
        if missing or cfg.season_pattern not in [p.name for p in PATTERNS]:
            raise ConfigError(
                f"append.season: unknown colour or pattern {missing or cfg.season_pattern}"
            )
        palette = np.array([names.index(c) for c in cfg.season_colours])
        season_pattern = [p.name for p in PATTERNS].index(cfg.season_pattern)
        chosen = np.isin(queries.colour, palette) | (queries.pattern == season_pattern)
        queries = replace(queries, popularity=_boost(queries.popularity, chosen, cfg.season_boost))
        codes = rng.integers(0, len(catalog.categories), size=n_new)
        first = len(state.catalog) + (0 if added is None else len(added))
        seasonal = _new_catalog(state, catalog.categories, codes, rng, first)
        seasonal = replace(
            seasonal,
            colour=rng.choice(palette, size=n_new),
            pattern=np.where(rng.random(n_new) < 0.5, season_pattern, seasonal.pattern),
        )
        added = seasonal if added is None else _merge_catalog(added, seasonal)
    if "query_mix" in cfg.drift:
        named = np.unique(queries.category[queries.category >= 0])
        k = min(cfg.query_mix_categories, len(named))
        boosted = rng.choice(named, size=k, replace=False)
        queries = replace(
            queries,
            popularity=_boost(
                queries.popularity, np.isin(queries.category, boosted), cfg.query_mix_boost
            ),
        )
    if "clicks" in cfg.drift:
        behaviour = {"position_bias_power": cfg.position_bias_power, "click_noise": cfg.click_noise}
    if added is not None:
        catalog = _merge_catalog(catalog, added)
    return replace(state, catalog=catalog, queries=queries, behaviour=behaviour), added


def _concat(path: Path, columns: dict) -> None:
    """The file's rows as they were, then the new ones."""
    new = pa.table(columns)
    old = pq.read_table(path)
    pq.write_table(pa.concat_tables([old, new.select(old.column_names).cast(old.schema)]), path)


def append_days(data_dir: Path, cfg: AppendConfig, progress: bool = True) -> AppendSummary:
    """Draw `cfg.days` further days (with `cfg.drift`) into the world in `data_dir`."""
    start = time.perf_counter()
    data_dir = Path(data_dir)
    state, manifest = _read_state(data_dir)
    seed = cfg.seed or state.synth.seed
    n_old, n_queries_old = len(state.catalog), len(state.queries)
    state, added = _drift(state, cfg, seed)
    n_added = 0 if added is None else len(added)

    if added is not None:
        titles = [
            make_title(
                rng_for(state.synth.seed, Purpose.TITLE, n_old + i),
                added.categories[added.category[i]],
                COLOURS[added.colour[i]],
                PATTERNS[added.pattern[i]],
                int(added.title_state[i]),
            )
            for i in range(n_added)
        ]
        paths = [data_dir / IMAGES_DIR / f"{p}.jpg" for p in added.product_ids]
        truth = draw_images(state.synth, added, paths, progress, first_index=n_old)
        _concat(data_dir / f"{PRODUCTS}.parquet", product_columns(added, titles))
        _concat(
            data_dir / TRUTH_DIR / f"{PRODUCTS}.parquet",
            truth_product_columns(added, titles, truth),
        )

    day_cfg = state.synth.model_copy(update={"seed": seed, **state.behaviour})
    pools = build_pools(state.catalog, state.queries)
    days = range(state.days, state.days + cfg.days)
    logs = [
        simulate_day(day_cfg, state.catalog, state.queries, pools, day)
        for day in tqdm(days, desc="appending days", unit="day", disable=not progress)
    ]
    columns = impression_columns(logs, state.catalog, state.queries)
    _concat(data_dir / f"{IMPRESSIONS}.parquet", columns)
    pq.write_table(
        pa.table(truth_query_columns(state.queries, state.catalog.categories)),
        data_dir / TRUTH_DIR / QUERIES,
    )

    n_impressions = len(columns["day"])
    counts = manifest["counts"]
    manifest.update(
        days=state.days + cfg.days,
        test_days=list(
            range(state.days + cfg.days - state.synth.size.test_days, state.days + cfg.days)
        ),
        categories=[c.name for c in state.catalog.categories],
        behaviour=state.behaviour,
        counts={
            "products": len(state.catalog),
            "queries": len(state.queries),
            "searches": counts["searches"] + sum(len(log.query) for log in logs),
            "impressions": counts["impressions"] + n_impressions,
            "clicks": counts["clicks"] + int(sum(log.clicked.sum() for log in logs)),
        },
    )
    manifest.setdefault("appended", []).append(
        {
            "first_day": state.days,
            "days": cfg.days,
            "drift": list(cfg.drift),
            "seed": seed,
            "new_products": n_added,
            "new_queries": len(state.queries) - n_queries_old,
        }
    )
    (data_dir / WORLD_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return AppendSummary(
        first_day=days[0],
        days=cfg.days,
        drift=tuple(cfg.drift),
        new_products=n_added,
        new_queries=len(state.queries) - n_queries_old,
        n_impressions=n_impressions,
        seconds=time.perf_counter() - start,
    )
