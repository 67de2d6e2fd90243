"""The features stage: for every validated product, the image tokens CE-BERT reads (paper 2.1).

- patch tokens: the RoI (components/features/roi.py) cut into grid x grid patches, each patch
resized to
  `patch_input` and encoded by the CNN into one vector (FashionBERT's "full" variant: the same grid
  over the whole image, no RoI). We encode each patch crop on its own, as FashionBERT does, rather
  than pooling regions of one feature map, so a patch's vector sees only that patch.
- pixel tokens: the whole image (not the RoI: the paper resizes "the image") resized to
  `pixel_size`, cut into (pixel_size / pixel_patch)^2 patches, each flattened row-major (y, x, rgb).
  They are stored as uint8, which is exact and 4x smaller than float32; the model scales them.

The store (`artifacts/features/`) is memory-mappable .npy arrays keyed by `index.parquet`
(product_id -> row, with the image's md5 and its RoI box) plus `manifest.json`. Patch features are
float16: the stage measures the largest relative error that costs and records it. Products whose
image fails here are listed in `failed.parquet` with their reason, and left out of the store.
When the previous store was made with the same settings, rows for unchanged images (same id and
md5) are copied instead of recomputed, so adding products only computes the new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from components.atomic import publish_dir
from components.config import FeaturesConfig, Params
from components.errors import DataError
from components.features.backbones import PatchEncoder
from components.features.roi import Box, detect_roi, grid_boxes, iou

STORE_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.parquet"
FAILED = "failed.parquet"
PIXELS = "pixels.npy"
SAMPLES = "samples.png"
_CHUNK = 64  # products per CNN round trip
_REPORTS = 10  # progress lines per run

log = logging.getLogger(__name__)


def patches_file(variant: str) -> str:
    return f"patches_{variant}.npy"


@dataclass(frozen=True)
class FeaturesReport:
    n_products: int
    n_computed: int
    n_reused: int
    n_failed: int
    roi_fallbacks: int
    seconds: float
    fp16_max_rel_error: float
    roi_mean_iou: float | None  # against the world's hidden boxes, when data/truth has them
    roi_share_iou_ge_07: float | None

    def metrics(self) -> dict[str, float]:
        out = {
            "n_products": float(self.n_products),
            "n_computed": float(self.n_computed),
            "n_reused": float(self.n_reused),
            "n_failed": float(self.n_failed),
            "roi_fallbacks": float(self.roi_fallbacks),
            "roi_fallback_share": self.roi_fallbacks / max(1, self.n_products),
            "images_per_second": self.n_computed / self.seconds if self.seconds else 0.0,
            "seconds": self.seconds,
            "fp16_max_rel_error": self.fp16_max_rel_error,
        }
        if self.roi_mean_iou is not None and self.roi_share_iou_ge_07 is not None:
            out["roi_mean_iou"] = self.roi_mean_iou
            out["roi_share_iou_ge_0.7"] = self.roi_share_iou_ge_07
        return out


class FeatureStore:
    """Read side of the store: rows by product id, arrays memory-mapped."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.exists():
            raise DataError(f"{manifest_path}: no feature store here (run the features stage)")
        self.manifest: dict = json.loads(manifest_path.read_text(encoding="utf-8"))
        self.index = pd.read_parquet(self.root / INDEX)
        self.row_of: dict[str, int] = dict(zip(self.index.product_id, self.index.row, strict=True))

    def patches(self, variant: str) -> np.ndarray:
        path = self.root / patches_file(variant)
        if not path.exists():
            raise DataError(
                f"{self.root}: no {variant!r} patches in this feature store (it has "
                f"{', '.join(self.manifest.get('variants', []))}): run the features stage with "
                f"-S 'features.variants=[roi,full]'"
            )
        return np.load(path, mmap_mode="r")

    def pixels(self) -> np.ndarray:
        return np.load(self.root / PIXELS, mmap_mode="r")

    def box(self, product_id: str) -> Box:
        row = self.index.iloc[self.row_of[product_id]]
        return int(row.roi_x0), int(row.roi_y0), int(row.roi_x1), int(row.roi_y1)


def settings_signature(cfg: FeaturesConfig) -> str:
    """What the stored values depend on; the same signature means reusable rows."""
    relevant = cfg.model_dump(
        mode="json", include={"backbone", "grid", "patch_input", "pixel_size", "pixel_patch", "roi"}
    )
    relevant["store_version"] = STORE_VERSION
    return hashlib.md5(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def pixel_tokens(image_rgb: np.ndarray, size: int, patch: int) -> np.ndarray:
    """(n_tokens, patch*patch*3) uint8: the image resized to size x size, tiled row-major."""
    resized = cv2.resize(image_rgb, (size, size), interpolation=cv2.INTER_AREA)
    n = size // patch
    tiles = resized.reshape(n, patch, n, patch, 3).transpose(0, 2, 1, 3, 4)
    return tiles.reshape(n * n, patch * patch * 3)


def patch_crops(image_rgb: np.ndarray, box: Box, grid: int) -> list[np.ndarray]:
    return [image_rgb[y0:y1, x0:x1] for x0, y0, x1, y1 in grid_boxes(box, grid)]


def _read(path: Path) -> tuple[bytes | None, str, str]:
    """(the file's bytes or None, their md5, failure reason); decoding waits until needed."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, "", f"unreadable: {err.strerror or err}"
    return data, hashlib.md5(data).hexdigest(), ""


def _decode(data: bytes) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _previous(out_dir: Path, signature: str, variants: tuple[str, ...]) -> FeatureStore | None:
    try:
        store = FeatureStore(out_dir)
    except (DataError, OSError, ValueError):
        return None
    same = store.manifest.get("signature") == signature
    has_all = all((out_dir / patches_file(v)).exists() for v in variants)
    return store if same and has_all else None


def build_features(
    products: pd.DataFrame,
    data_dir: Path,
    out_dir: Path,
    cfg: FeaturesConfig,
    truth: pd.DataFrame | None = None,
    progress: bool = True,
) -> FeaturesReport:
    """Compute (or reuse) every product's tokens and write the store atomically to `out_dir`."""
    from components.features.backbones import load_patch_encoder

    start = time.perf_counter()
    signature = settings_signature(cfg)
    previous = _previous(out_dir, signature, cfg.variants)
    encoder = load_patch_encoder(cfg.backbone, cfg.device, cfg.patch_input)
    batch = cfg.batch_size or None
    n = len(products)
    report: FeaturesReport | None = None

    def write(work: Path) -> None:
        nonlocal report
        arrays = {
            v: np.lib.format.open_memmap(
                work / patches_file(v), "w+", np.float16, (n, cfg.n_patches, encoder.feature_dim)
            )
            for v in cfg.variants
        }
        pixels = np.lib.format.open_memmap(
            work / PIXELS, "w+", np.uint8, (n, cfg.n_pixel_tokens, cfg.pixel_dim)
        )
        boxes = np.zeros((n, 4), np.int64)
        fallback = np.zeros(n, bool)
        md5s = [""] * n
        ok = np.zeros(n, bool)
        failures: list[tuple[str, str]] = []
        reused = computed = 0
        # Reused rows keep the conversion error measured when they were computed.
        fp16_error = float(previous.manifest.get("fp16_max_rel_error", 0.0)) if previous else 0.0

        # The previous store's arrays and columns, opened once rather than per reused row.
        if previous is not None:
            old_patches = {v: previous.patches(v) for v in cfg.variants}
            old_pixels = previous.pixels()
            old_md5 = previous.index.image_md5.to_numpy()
            old_boxes = previous.index[["roi_x0", "roi_y0", "roi_x1", "roi_y1"]].to_numpy()
            old_fallback = previous.index.roi_fallback.to_numpy()
        ids = products.product_id.astype(str).tolist()
        paths = [data_dir / p for p in products.image_path.astype(str)]
        bar = tqdm(total=n, desc="features", unit="img", disable=not progress)
        report_every, done = max(1, n // _REPORTS), 0
        with ThreadPoolExecutor(cfg.read_workers) as pool:
            for rows in _chunks(list(range(n)), _CHUNK):
                loaded = list(pool.map(_read, [paths[r] for r in rows]))
                fresh: list[tuple[int, bytes]] = []
                for r, (data, md5, reason) in zip(rows, loaded, strict=True):
                    md5s[r] = md5
                    if data is None:
                        failures.append((ids[r], f"{paths[r]}: {reason}"))
                        continue
                    old_row = previous.row_of.get(ids[r]) if previous else None
                    if old_row is not None and old_md5[old_row] == md5:
                        for v in cfg.variants:
                            arrays[v][r] = old_patches[v][old_row]
                        pixels[r] = old_pixels[old_row]
                        boxes[r] = old_boxes[old_row]
                        fallback[r] = bool(old_fallback[old_row])
                        ok[r] = True
                        reused += 1
                    else:
                        fresh.append((r, data))
                decoded = list(pool.map(_decode, [data for _, data in fresh]))
                rgbs = []
                for (r, _), image in zip(fresh, decoded, strict=True):
                    if image is None:
                        failures.append((ids[r], f"{paths[r]}: does not decode as an image"))
                        continue
                    roi = detect_roi(image, cfg.roi)
                    boxes[r], fallback[r] = roi.box, roi.fallback
                    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                    pixels[r] = pixel_tokens(rgb, cfg.pixel_size, cfg.pixel_patch)
                    rgbs.append((r, rgb))
                    ok[r] = True
                if rgbs:
                    error = _encode_rows(rgbs, boxes, cfg.grid, encoder, batch, arrays)
                    fp16_error = max(fp16_error, error)
                    computed += len(rgbs)
                bar.update(len(rows))
                done += len(rows)
                if done // report_every > (done - len(rows)) // report_every or done == n:
                    log.info(
                        "features: %d/%d images (%d computed, %d reused, %d failed), %.1f img/s",
                        done,
                        n,
                        computed,
                        reused,
                        len(failures),
                        done / (time.perf_counter() - start),
                    )
        bar.close()

        keep = np.flatnonzero(ok)
        index = pd.DataFrame(
            {
                "product_id": [ids[r] for r in keep],
                "row": np.arange(len(keep), dtype=np.int64),
                "image_md5": [md5s[r] for r in keep],
                "roi_x0": boxes[keep, 0],
                "roi_y0": boxes[keep, 1],
                "roi_x1": boxes[keep, 2],
                "roi_y1": boxes[keep, 3],
                "roi_fallback": fallback[keep],
            }
        )
        named = {**{patches_file(v): a for v, a in arrays.items()}, PIXELS: pixels}
        for name, array in named.items():
            array.flush()
            if len(keep) < n:  # compact: a failed product must not leave an all-zero row behind
                np.save(work / f"{name}.compact.npy", array[keep])
                os.replace(work / f"{name}.compact.npy", work / name)
        del arrays, pixels, named
        index.to_parquet(work / INDEX, index=False)
        pd.DataFrame(failures, columns=["product_id", "reason"]).to_parquet(
            work / FAILED, index=False
        )

        mean_iou = share_iou = None
        if truth is not None and len(index):
            mean_iou, share_iou = _truth_iou(index, truth)
        seconds = time.perf_counter() - start
        report = FeaturesReport(
            n_products=len(keep),
            n_computed=computed,
            n_reused=reused,
            n_failed=len(failures),
            roi_fallbacks=int(fallback[keep].sum()),
            seconds=seconds,
            fp16_max_rel_error=fp16_error,
            roi_mean_iou=mean_iou,
            roi_share_iou_ge_07=share_iou,
        )
        manifest = {
            "store_version": STORE_VERSION,
            "signature": signature,
            "settings": cfg.model_dump(mode="json"),
            "backbone": encoder.name,
            "feature_dim": encoder.feature_dim,
            "n_patches": cfg.n_patches,
            "n_pixel_tokens": cfg.n_pixel_tokens,
            "pixel_dim": cfg.pixel_dim,
            "variants": list(cfg.variants),
            "counts": {k: v for k, v in report.metrics().items() if k.startswith("n_")},
            "fp16_max_rel_error": fp16_error,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if cfg.samples_logged:
            write_sample_sheet(products.head(cfg.samples_logged), data_dir, index, cfg.grid, work)

    publish_dir(out_dir, write)
    assert report is not None
    return report


def _encode_rows(
    rgbs: list[tuple[int, np.ndarray]],
    boxes: np.ndarray,
    grid: int,
    encoder: PatchEncoder,
    batch: int | None,
    arrays: dict[str, np.ndarray],
) -> float:
    """Encode the patches of each variant into `arrays`; return float16's largest relative error."""
    worst = 0.0
    for variant, array in arrays.items():
        crops: list[np.ndarray] = []
        for r, rgb in rgbs:
            h, w = rgb.shape[:2]
            box = tuple(boxes[r]) if variant == "roi" else (0, 0, w, h)
            crops.extend(patch_crops(rgb, box, grid))
        feats = encoder.encode(crops, batch_size=batch).numpy()
        half = feats.astype(np.float16)
        scale = np.linalg.norm(feats, axis=1).clip(min=1e-12)
        error = np.linalg.norm(feats - half.astype(np.float32), axis=1) / scale
        worst = max(worst, float(error.max()))
        for (r, _), value in zip(rgbs, half.reshape(len(rgbs), grid * grid, -1), strict=True):
            array[r] = value
    return worst


def _truth_iou(index: pd.DataFrame, truth: pd.DataFrame) -> tuple[float, float]:
    joined = index.merge(truth, on="product_id", how="inner")
    scores = np.array(
        [
            iou(
                (r.roi_x0, r.roi_y0, r.roi_x1, r.roi_y1),
                (r.bbox_x0, r.bbox_y0, r.bbox_x1, r.bbox_y1),
            )
            for r in joined.itertuples()
        ]
    )
    return float(scores.mean()), float((scores >= 0.7).mean())


def draw_roi(image_bgr: np.ndarray, box: Box, grid: int) -> np.ndarray:
    """The image with its RoI (red) and patch grid (yellow) drawn on a copy."""
    canvas = image_bgr.copy()
    for x0, y0, x1, y1 in grid_boxes(box, grid):
        cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), (0, 215, 255), 1)
    x0, y0, x1, y1 = box
    cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 255), 2)
    return canvas


def write_sample_sheet(
    sample: pd.DataFrame, data_dir: Path, index: pd.DataFrame, grid: int, out_dir: Path
) -> Path | None:
    """A contact sheet of products with their RoI and grid: what the model sees."""
    boxes = index.set_index("product_id")
    tiles = []
    for row in sample.itertuples():
        if row.product_id not in boxes.index:
            continue
        image = cv2.imread(str(data_dir / row.image_path))
        b = boxes.loc[row.product_id]
        drawn = draw_roi(image, (b.roi_x0, b.roi_y0, b.roi_x1, b.roi_y1), grid)
        tiles.append(cv2.resize(drawn, (200, 200), interpolation=cv2.INTER_AREA))
    if not tiles:
        return None
    cols = 4
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % cols)
    sheet = np.vstack([np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)])
    path = out_dir / SAMPLES
    cv2.imwrite(str(path), sheet)
    return path


def show_product(product_id: str, params: Params, out: Path) -> Path:
    """Write `out`: the product's image with the RoI the store holds (or detects now) and grid."""
    data_dir = params.paths.data_dir
    products_file = params.paths.artifacts_dir / "validate" / "products.parquet"
    if not products_file.exists():
        raise DataError(f"{products_file}: not found (run the validate stage first)")
    products = pd.read_parquet(products_file).set_index("product_id")
    if product_id not in products.index:
        raise DataError(f"{products_file}: no product {product_id!r}")
    image_path = data_dir / str(products.loc[product_id, "image_path"])
    image = cv2.imread(str(image_path))
    if image is None:
        raise DataError(f"{image_path}: does not decode as an image")
    store_dir = params.paths.artifacts_dir / "features"
    try:
        box = FeatureStore(store_dir).box(product_id)
    except (DataError, KeyError, OSError):
        box = detect_roi(image, params.features.roi).box
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), draw_roi(image, box, params.features.grid))
    return out
