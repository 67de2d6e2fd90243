"""Text of the world: long noisy product titles, and short noisy queries with Zipf popularity."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from components.config import ConfigError, SynthConfig
from components.data.world.catalog import CORRECT, OMITTED, Catalog
from components.data.world.seeding import Purpose, rng_for
from components.data.world.vocab import (
    AUDIENCES,
    BRANDS,
    COLOURS,
    MARKETING,
    MATERIALS,
    MULTICOLOR,
    MULTICOLOR_PHRASES,
    OMIT_PHRASES,
    PATTERNS,
    SIZE_RUNS,
    STYLES,
    Category,
    Colour,
    Pattern,
    frequencies,
)

T = TypeVar("T")


def pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    """One uniformly chosen item; faster than rng.choice for short Python sequences."""
    return items[int(rng.integers(len(items)))]


def _name_or_synonym(rng: np.random.Generator, name: str, synonyms: Sequence[str]) -> str:
    return name if rng.random() < 0.8 else pick(rng, synonyms)


# ---------------------------------------------------------------------------------------- titles


@dataclass(frozen=True)
class Title:
    text: str
    colour: str | None  # the colour the title claims (canonical name or "multicolor"), if any
    pattern: str | None  # the pattern it claims, if any


def _attribute_phrase(
    rng: np.random.Generator, colour: Colour, pattern: Pattern, state: int
) -> tuple[str, str | None, str | None]:
    """What the title says about colour and pattern, and what that claims (canonical names)."""
    if state == CORRECT:
        col = _name_or_synonym(rng, colour.name, colour.synonyms)
        pat = _name_or_synonym(rng, pattern.name, pattern.synonyms)
        return f"{col} {pat}", colour.name, pattern.name
    if state == OMITTED:
        return pick(rng, OMIT_PHRASES), None, None
    if rng.random() < 0.3:
        col, claimed_colour = pick(rng, MULTICOLOR_PHRASES), MULTICOLOR
    else:
        wrong = pick(rng, [c for c in COLOURS if c != colour])
        col, claimed_colour = _name_or_synonym(rng, wrong.name, wrong.synonyms), wrong.name
    stated = pattern if rng.random() < 0.5 else pick(rng, [p for p in PATTERNS if p != pattern])
    pat = _name_or_synonym(rng, stated.name, stated.synonyms)
    return f"{col} {pat}", claimed_colour, stated.name


def make_title(
    rng: np.random.Generator, category: Category, colour: Colour, pattern: Pattern, state: int
) -> Title:
    """A marketplace-style title: brand, hype, style, attributes, material, category, sizes."""
    group = category.group
    attributes, claimed_colour, claimed_pattern = _attribute_phrase(rng, colour, pattern, state)
    noun = _name_or_synonym(rng, category.name, category.synonyms)
    middle = [
        pick(rng, AUDIENCES[group]) if rng.random() < 0.6 else "",
        pick(rng, STYLES) if rng.random() < 0.9 else "",
        attributes,
        pick(rng, MATERIALS[group]) if rng.random() < 0.7 else "",
        noun,
    ]
    if rng.random() < 0.3:  # sellers do not agree on word order
        middle = [middle[i] for i in rng.permutation(len(middle))]
    hype = [MARKETING[i] for i in rng.permutation(len(MARKETING))[: int(rng.integers(1, 4))]]
    parts = [
        pick(rng, BRANDS) if rng.random() < 0.85 else "",
        pick(rng, MARKETING) if rng.random() < 0.6 else "",
        *middle,
        pick(rng, category.synonyms) if rng.random() < 0.3 else "",
        pick(rng, SIZE_RUNS[group]) if rng.random() < 0.7 else "",
        *hype,
    ]
    words = " ".join(parts).split()
    if rng.random() < 0.6:
        words = [w[:1].upper() + w[1:] for w in words]
    return Title(" ".join(words), claimed_colour, claimed_pattern)


def make_titles(catalog: Catalog, seed: int) -> list[Title]:
    """Every product's title, each from its own (seed, TITLE, product) stream."""
    return [
        make_title(
            rng_for(seed, Purpose.TITLE, i),
            catalog.categories[catalog.category[i]],
            COLOURS[catalog.colour[i]],
            PATTERNS[catalog.pattern[i]],
            int(catalog.title_state[i]),
        )
        for i in range(len(catalog))
    ]


# --------------------------------------------------------------------------------------- queries

# Templates by word count: slots in canonical order (modifier, colour, pattern, category).
_TEMPLATES: dict[int, tuple[tuple[tuple[str, ...], float], ...]] = {
    1: ((("cat",), 0.8), (("col",), 0.2)),
    2: ((("col", "cat"), 0.5), (("pat", "cat"), 0.25), (("mod", "cat"), 0.25)),
    3: ((("col", "pat", "cat"), 0.45), (("mod", "col", "cat"), 0.35), (("mod", "pat", "cat"), 0.2)),
    4: ((("mod", "col", "pat", "cat"), 1.0),),
}
_WORD_COUNT_P = {1: 0.12, 2: 0.38, 3: 0.32, 4: 0.18}
_COLOUR_P = frequencies(COLOURS)  # queries name popular colours more often, like the catalog
_MAX_ATTEMPTS = 1000  # redraws per query slot before the vocabulary is declared too small


@dataclass(frozen=True)
class QuerySet:
    """Distinct queries in popularity order (index 0 = rank 1); attribute index -1 = not named."""

    text: tuple[str, ...]
    canonical: tuple[str, ...]
    category: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    modifier: tuple[str | None, ...]
    synonym: np.ndarray
    typo: np.ndarray
    shuffled: np.ndarray
    popularity: np.ndarray  # P(a search issues this query): Zipf over rank

    def __len__(self) -> int:
        return len(self.text)


@dataclass(frozen=True)
class _Query:
    words: tuple[str, ...]
    canonical: tuple[str, ...]
    category: int
    colour: int
    pattern: int
    modifier: str | None


def _typo(rng: np.random.Generator, word: str) -> str:
    """One character-level edit (drop, swap, replace or insert) that changes the word."""
    while True:
        i = int(rng.integers(len(word)))
        op = int(rng.integers(4))
        letter = pick(rng, string.ascii_lowercase)
        if op == 0:
            out = word[:i] + word[i + 1 :]
        elif op == 1 and i < len(word) - 1:
            out = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        elif op == 2:
            out = word[:i] + letter + word[i + 1 :]
        else:
            out = word[:i] + letter + word[i:]
        if out != word and out:
            return out


def _draw_query(
    rng: np.random.Generator,
    categories: Sequence[Category],
    synonym: bool,
    typo: bool,
    shuffle: bool,
) -> _Query:
    sizes = [k for k in _WORD_COUNT_P if k > 1 or not shuffle]  # one word cannot be reordered
    size_p = np.array([_WORD_COUNT_P[k] for k in sizes])
    size = sizes[int(rng.choice(len(sizes), p=size_p / size_p.sum()))]
    templates = _TEMPLATES[size]
    t_p = np.array([p for _, p in templates])
    slots = templates[int(rng.choice(len(templates), p=t_p / t_p.sum()))][0]

    cat = int(rng.integers(len(categories))) if "cat" in slots else -1
    col = int(rng.choice(len(COLOURS), p=_COLOUR_P)) if "col" in slots else -1
    pat = int(rng.integers(len(PATTERNS))) if "pat" in slots else -1
    modifier = None
    if "mod" in slots:
        modifier = pick(rng, STYLES if rng.random() < 0.6 else MATERIALS[categories[cat].group])

    # (canonical word, its synonyms) per slot
    named = {
        "mod": (modifier, ()),
        "col": (COLOURS[col].name, COLOURS[col].synonyms) if col >= 0 else None,
        "pat": (PATTERNS[pat].name, PATTERNS[pat].synonyms) if pat >= 0 else None,
        "cat": (categories[cat].name, categories[cat].synonyms) if cat >= 0 else None,
    }
    canonical = tuple(named[s][0] for s in slots)
    words = list(canonical)
    if synonym:
        swappable = [i for i, s in enumerate(slots) if named[s][1]]
        i = pick(rng, swappable)
        words[i] = pick(rng, named[slots[i]][1])
    if shuffle:
        order = rng.permutation(len(words))
        while (order == np.arange(len(words))).all():
            order = rng.permutation(len(words))
        words = [words[i] for i in order]
    if typo:
        i = int(rng.integers(len(words)))
        words[i] = _typo(rng, words[i])
    return _Query(tuple(words), canonical, cat, col, pat, modifier)


def zipf_popularity(n: int, exponent: float) -> np.ndarray:
    """P(rank r) proportional to r^-exponent, r = 1..n."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return w / w.sum()


def make_queries(cfg: SynthConfig, categories: Sequence[Category]) -> QuerySet:
    """`n_queries` distinct queries; noise flags are drawn first, so their shares are unbiased
    by the redraws that keep query strings distinct."""
    n = cfg.size.n_queries
    rng = rng_for(cfg.seed, Purpose.QUERY)
    synonym = rng.random(n) < cfg.query_synonym_share
    typo = rng.random(n) < cfg.query_typo_share
    shuffled = rng.random(n) < cfg.query_shuffle_share
    seen: set[str] = set()
    drawn: list[_Query] = []
    for i in range(n):
        for _ in range(_MAX_ATTEMPTS):
            q = _draw_query(rng, categories, bool(synonym[i]), bool(typo[i]), bool(shuffled[i]))
            text = " ".join(q.words)
            if text not in seen:
                break
        else:
            raise ConfigError(f"synth: cannot draw {n} distinct queries from this vocabulary")
        seen.add(text)
        drawn.append(q)

    # Hot queries are short and clean, as in real logs; noise keeps the order loose.
    score = (
        np.array([len(q.words) for q in drawn])
        + 1.5 * typo
        + 0.5 * synonym
        + 0.5 * shuffled
        + rng.normal(0.0, 0.8, n)
    )
    order = np.argsort(score, kind="stable")
    ranked = [drawn[i] for i in order]
    return QuerySet(
        text=tuple(" ".join(q.words) for q in ranked),
        canonical=tuple(" ".join(q.canonical) for q in ranked),
        category=np.array([q.category for q in ranked], dtype=np.int64),
        colour=np.array([q.colour for q in ranked], dtype=np.int64),
        pattern=np.array([q.pattern for q in ranked], dtype=np.int64),
        modifier=tuple(q.modifier for q in ranked),
        synonym=synonym[order],
        typo=typo[order],
        shuffled=shuffled[order],
        popularity=zipf_popularity(n, cfg.zipf_exponent),
    )
