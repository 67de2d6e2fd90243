"""The shop world's vocabulary: categories, colours, patterns and the words titles and queries use.

Every word list here is disjoint from the colour and pattern words (tests check it), so a title
that omits or misstates the colour can never state the true one by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Colour:
    name: str
    rgb: tuple[int, int, int]
    synonyms: tuple[str, ...]
    weight: float  # relative frequency in the catalog: black and white sell more than orange


@dataclass(frozen=True)
class Pattern:
    name: str
    synonyms: tuple[str, ...]
    weight: float


@dataclass(frozen=True)
class Category:
    name: str
    synonyms: tuple[str, ...]
    group: str  # apparel | footwear | accessory | home: picks materials, sizes and audiences
    aspect: float  # typical width / height of the object's box


COLOURS: tuple[Colour, ...] = (
    Colour("red", (200, 30, 40), ("crimson", "scarlet", "ruby"), 0.10),
    Colour("blue", (30, 70, 190), ("navy", "azure", "cobalt"), 0.12),
    Colour("green", (40, 150, 60), ("emerald", "olive", "jade"), 0.07),
    Colour("yellow", (240, 205, 40), ("mustard", "lemon", "golden"), 0.05),
    Colour("black", (28, 28, 32), ("ebony", "jet", "onyx"), 0.16),
    Colour("white", (248, 248, 246), ("ivory", "snow", "pearl"), 0.14),
    Colour("pink", (240, 130, 180), ("blush", "fuchsia", "rose"), 0.07),
    Colour("purple", (120, 50, 160), ("violet", "lilac", "plum"), 0.05),
    Colour("orange", (245, 130, 20), ("tangerine", "amber", "apricot"), 0.04),
    Colour("brown", (115, 70, 38), ("chocolate", "coffee", "camel"), 0.06),
    Colour("grey", (128, 128, 128), ("gray", "charcoal", "silver"), 0.08),
    Colour("beige", (222, 196, 150), ("khaki", "sand", "nude"), 0.06),
)

PATTERNS: tuple[Pattern, ...] = (
    Pattern("solid", ("plain", "monochrome"), 0.40),
    Pattern("striped", ("stripe", "stripes", "pinstripe"), 0.15),
    Pattern("dotted", ("polka", "dots", "spotted"), 0.12),
    Pattern("checked", ("plaid", "checkered", "gingham"), 0.12),
    Pattern("zigzag", ("chevron", "wavy"), 0.09),
    Pattern("floral", ("flower", "flowery", "blossom"), 0.12),
)

# Order matters: a world with n_categories uses the first n, so the most distinct shapes come first.
CATEGORIES: tuple[Category, ...] = (
    Category("dress", ("gown", "frock", "sundress"), "apparel", 0.62),
    Category("t-shirt", ("tee", "tshirt"), "apparel", 1.0),
    Category("trousers", ("pants", "slacks"), "apparel", 0.55),
    Category("skirt", ("miniskirt",), "apparel", 0.95),
    Category("shorts", ("bermudas", "trunks"), "apparel", 1.3),
    Category("jacket", ("coat", "blazer", "parka"), "apparel", 0.9),
    Category("shoe", ("sneaker", "trainer", "loafer"), "footwear", 1.9),
    Category("boot", ("booties", "wellies"), "footwear", 0.8),
    Category("sock", ("socks", "stocking"), "apparel", 0.65),
    Category("glove", ("gloves", "mitten"), "apparel", 0.8),
    Category("hat", ("cap", "beanie", "fedora"), "apparel", 1.6),
    Category("scarf", ("shawl", "muffler", "stole"), "apparel", 0.6),
    Category("bag", ("handbag", "purse", "tote"), "accessory", 1.15),
    Category("backpack", ("rucksack", "knapsack", "schoolbag"), "accessory", 0.75),
    Category("watch", ("wristwatch", "timepiece"), "accessory", 0.45),
    Category("sunglasses", ("shades", "eyewear", "spectacles"), "accessory", 2.4),
    Category("umbrella", ("parasol", "brolly"), "accessory", 1.0),
    Category("mug", ("cup", "tumbler"), "home", 1.15),
    Category("teapot", ("kettle", "teakettle"), "home", 1.35),
    Category("bottle", ("flask", "canteen"), "home", 0.4),
    Category("vase", ("urn", "planter"), "home", 0.65),
    Category("lamp", ("lampshade", "lantern"), "home", 0.6),
    Category("chair", ("armchair", "seat"), "home", 0.7),
    Category("sofa", ("couch", "settee"), "home", 1.9),
    Category("table", ("desk",), "home", 1.5),
    Category("pillow", ("cushion",), "home", 1.0),
    Category("clock", ("alarmclock",), "home", 0.95),
)

# What a title says instead of a colour it omits, and what it says when it misstates it vaguely.
OMIT_PHRASES: tuple[str, ...] = ("as picture", "as shown", "picture color", "see photo", "")
MULTICOLOR_PHRASES: tuple[str, ...] = ("multicolor", "multi color", "mixed colors")
MULTICOLOR = "multicolor"

BRANDS: tuple[str, ...] = (
    "Zenlyn", "Aurava", "Kobiq", "Mirelle", "Tovana", "Quorra", "Velmo", "Nordik", "Halvo",
    "Pexa", "Lumio", "Orvani", "Tamsin", "Yulara", "Fenwick", "Caspio", "Marlo", "Sevvy",
    "Kaito", "Lunesse", "Rivka", "Solenne", "Trexa", "Vantor", "Wylde", "Xenia", "Ozzo",
    "Belmira", "Quillo", "Danvers",
)  # fmt: skip

STYLES: tuple[str, ...] = (
    "vintage", "casual", "elegant", "modern", "classic", "cute", "luxury", "minimalist", "boho",
    "retro", "sporty", "chic", "oversized", "korean", "nordic", "portable", "waterproof",
    "handmade",
)  # fmt: skip

MATERIALS: dict[str, tuple[str, ...]] = {
    "apparel": ("cotton", "linen", "wool", "polyester", "silk", "velvet", "denim", "chiffon"),
    "footwear": ("leather", "suede", "mesh", "rubber", "canvas"),
    "accessory": ("leather", "nylon", "canvas", "metal", "alloy"),
    "home": ("ceramic", "glass", "wooden", "bamboo", "stainless", "porcelain", "plastic"),
}

SIZE_RUNS: dict[str, tuple[str, ...]] = {
    "apparel": ("S M L XL 2XL", "XS S M L XL", "S-3XL", "M L XL XXL 3XL", "plus size 4XL 5XL",
                "one size"),
    "footwear": ("EU 35-44", "US 5-12", "size 36 37 38 39 40", "big size 45 46"),
    "accessory": ("one size", "small large", "adjustable"),
    "home": ("small medium large", "350ml", "500ml", "set of 2", "40x40cm", "large size"),
}  # fmt: skip

AUDIENCES: dict[str, tuple[str, ...]] = {
    "apparel": ("women", "men", "for women", "for men", "unisex", "girls", "ladies", "kids"),
    "footwear": ("women", "men", "for women", "for men", "unisex", "kids"),
    "accessory": ("unisex", "for women", "for men", "travel"),
    "home": ("for home", "living room", "kitchen", "office"),
}

MARKETING: tuple[str, ...] = (
    "hot sale", "2024 new arrival", "free shipping", "best gift", "high quality", "limited offer",
    "dropshipping", "fashion", "top rated", "wholesale", "2025 trend", "new", "promotion",
    "clearance", "bestseller", "fast delivery",
)  # fmt: skip


def colour_words(colour: Colour) -> tuple[str, ...]:
    """Every word that names `colour`: its name and its synonyms."""
    return (colour.name, *colour.synonyms)


def pattern_words(pattern: Pattern) -> tuple[str, ...]:
    return (pattern.name, *pattern.synonyms)


def category_words(category: Category) -> tuple[str, ...]:
    return (category.name, *category.synonyms)


def frequencies(items: tuple[Colour, ...] | tuple[Pattern, ...]) -> np.ndarray:
    """The items' weights as probabilities."""
    w = np.array([item.weight for item in items], dtype=np.float64)
    return w / w.sum()
