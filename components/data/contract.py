"""The data contract: what any producer of data (the synthetic world or a user's own export) writes.

data/
  products.parquet (or .csv)     product_id, title, category (optional), image_path
  impressions.parquet (or .csv)  search_id, query, product_id, position, clicked, day
  images/                        image files, referenced by image_path (relative to data/)
  world.json                     optional: how the data was produced (the synthetic world writes it)
  truth/                         optional, never model input: hidden ground truth for diagnostics
"""

from __future__ import annotations

from pathlib import Path

PRODUCTS = "products"
IMPRESSIONS = "impressions"

# column -> pandas dtype kind the validated tables carry
PRODUCT_COLUMNS: dict[str, str] = {
    "product_id": "string",
    "title": "string",
    "category": "string",
    "image_path": "string",
}
# Optional: a product without one gets NO_CATEGORY, so mixed negative sampling (finetune) draws
# its negatives at random instead of from the same category.
OPTIONAL_PRODUCT_COLUMNS = ("category",)
NO_CATEGORY = "(uncategorized)"
IMPRESSION_COLUMNS: dict[str, str] = {
    "search_id": "string",  # one search = one query issued once, with its ranked impressions
    "query": "string",
    "product_id": "string",
    "position": "int64",  # 1-based rank at which the product was shown
    "clicked": "int64",  # 1 clicked, 0 shown but not clicked
    "day": "int64",  # 0-based day index; the last `test_days` days are the test period
}

WORLD_MANIFEST = "world.json"
TRUTH_DIR = "truth"
IMAGES_DIR = "images"


def table_file(data_dir: Path, table: str) -> Path:
    """The file holding `table` in `data_dir`: Parquet preferred, CSV accepted."""
    for suffix in (".parquet", ".csv"):
        candidate = data_dir / f"{table}{suffix}"
        if candidate.exists():
            return candidate
    return data_dir / f"{table}.parquet"
