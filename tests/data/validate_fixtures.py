"""Small datasets for the validate stage's tests: a clean one, and helpers to break it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

QUERIES = ["red shirt", "blue dress", "striped scarf", "leather bag", "white sneakers"]


def write_image(path: Path, width: int, height: int, seed: int = 0, ext: str = ".jpg") -> bytes:
    """A small real image (noise plus a rectangle) at `path`; returns the file's bytes."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    cv2.rectangle(image, (width // 4, height // 4), (width // 2, height // 2), (0, 0, 255), -1)
    ok, encoded = cv2.imencode(ext, image)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
    return encoded.tobytes()


def clean_tables(data_dir: Path, n_products: int = 20, n_searches: int = 10, seed: int = 0):
    """(products, impressions) of a valid dataset; writes the products' images under data_dir."""
    rng = np.random.default_rng(seed)
    products = pd.DataFrame(
        {
            "product_id": [f"p{i:03d}" for i in range(n_products)],
            "title": [f"{QUERIES[i % len(QUERIES)]} model {i}" for i in range(n_products)],
            "category": [f"c{i % 4}" for i in range(n_products)],
            "image_path": [f"images/p{i:03d}.jpg" for i in range(n_products)],
        }
    )
    for i, relative in enumerate(products["image_path"]):
        write_image(data_dir / relative, 80 + 3 * i, 100 + 2 * i, seed=i)
    rows = []
    for s in range(n_searches):
        shown = rng.choice(n_products, size=10, replace=False)
        for position, product in enumerate(shown, start=1):
            rows.append(
                {
                    "search_id": f"s{s:03d}",
                    "query": QUERIES[s % len(QUERIES)],
                    "product_id": f"p{product:03d}",
                    "position": position,
                    "clicked": int(rng.random() < 0.3),
                    "day": s % 4,
                }
            )
    return products, pd.DataFrame(rows)


def write_tables(data_dir: Path, products: pd.DataFrame, impressions: pd.DataFrame, fmt: str):
    """Write both tables as `fmt` ("parquet" or "csv"); returns their paths."""
    paths = []
    for name, frame in (("products", products), ("impressions", impressions)):
        path = data_dir / f"{name}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        paths.append(path)
    return tuple(paths)


def insert_row(frame: pd.DataFrame, at: int, **values) -> pd.DataFrame:
    """`frame` with a row inserted at `at`: a copy of a nearby row with `values` changed."""
    row = frame.iloc[[min(at, len(frame) - 1)]].copy()
    for column, value in values.items():
        row[column] = pd.Series([value], index=row.index, dtype=object)
    return pd.concat([frame.iloc[:at], row, frame.iloc[at:]], ignore_index=True)


def replace_bytes(path: Path, marker: str, raw: bytes) -> None:
    """Swap a text marker in a written file for raw (e.g. non-UTF-8) bytes."""
    data = path.read_bytes()
    assert marker.encode() in data
    path.write_bytes(data.replace(marker.encode(), raw))
