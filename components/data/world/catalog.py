"""Products' true attributes: category, colour, pattern and how honestly the title states them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.config import ConfigError, SynthConfig
from components.data.world.seeding import Purpose, rng_for
from components.data.world.vocab import CATEGORIES, COLOURS, PATTERNS, Category, frequencies

# Index = the code stored in Catalog.title_state.
TITLE_STATES: tuple[str, ...] = ("correct", "omitted", "misstated")
CORRECT, OMITTED, MISSTATED = range(3)


@dataclass(frozen=True)
class Catalog:
    """One row per product; attributes are indices into `categories`, COLOURS and PATTERNS."""

    product_ids: tuple[str, ...]
    categories: tuple[Category, ...]
    category: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    title_state: np.ndarray

    def __len__(self) -> int:
        return len(self.product_ids)


def product_id(index: int, n_products: int) -> str:
    """'p000123': zero-padded to at least 6 digits so ids sort in catalog order."""
    return f"p{index:0{max(6, len(str(n_products - 1)))}d}"


def sample_catalog(cfg: SynthConfig) -> Catalog:
    """Draw every product's true attributes and title state from the (seed, CATALOG) stream."""
    if cfg.n_categories > len(CATEGORIES):
        raise ConfigError(
            f"synth.n_categories: {cfg.n_categories} asked, the world draws {len(CATEGORIES)}"
        )
    n = cfg.size.n_products
    rng = rng_for(cfg.seed, Purpose.CATALOG)
    categories = CATEGORIES[: cfg.n_categories]
    omit, misstate = cfg.title_omit_share, cfg.title_misstate_share
    # clip: 1 - 0.7 - 0.3 can come out a hair below zero in floating point
    states_p = np.clip([1 - omit - misstate, omit, misstate], 0, None)
    return Catalog(
        product_ids=tuple(product_id(i, n) for i in range(n)),
        categories=categories,
        category=rng.integers(0, len(categories), size=n),
        colour=rng.choice(len(COLOURS), size=n, p=frequencies(COLOURS)),
        pattern=rng.choice(len(PATTERNS), size=n, p=frequencies(PATTERNS)),
        title_state=rng.choice(3, size=n, p=states_p / states_p.sum()),
    )
