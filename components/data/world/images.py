"""Product images: a coloured, patterned silhouette on a cluttered light canvas, drawn with OpenCV.

Each image comes from its own (seed, IMAGE, product) random stream, so the bytes do not depend on
how many processes draw them. Boxes are (x0, y0, x1, y1) in pixels with x1, y1 exclusive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from components.config import SynthConfig
from components.data.world.catalog import Catalog
from components.data.world.seeding import Purpose, rng_for
from components.data.world.shapes import rasterize
from components.data.world.text import pick
from components.data.world.vocab import BRANDS, COLOURS, PATTERNS

JPEG_QUALITY = 90  # fixed, so the encoded bytes are a pure function of the pixels
_BOX_LIMIT = 0.98  # the object box keeps a small margin from the canvas border
_FONT = cv2.FONT_HERSHEY_SIMPLEX
DISTRACTOR_KINDS: tuple[str, ...] = ("logo", "price_tag", "watermark")
_CHUNK = 64  # products per task sent to a drawing process

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class RenderSettings:
    """The part of SynthConfig that image drawing needs (cheap to send to worker processes)."""

    seed: int
    canvas_min: int
    canvas_max: int
    fill_min: float
    fill_max: float
    clutter_shapes: int
    distractor_share: float

    @classmethod
    def from_config(cls, cfg: SynthConfig) -> RenderSettings:
        return cls(
            seed=cfg.seed,
            canvas_min=cfg.canvas_min,
            canvas_max=cfg.canvas_max,
            fill_min=cfg.object_fill_min,
            fill_max=cfg.object_fill_max,
            clutter_shapes=cfg.clutter_shapes,
            distractor_share=cfg.distractor_share,
        )


@dataclass(frozen=True)
class ImageTruth:
    """Where things are in one drawn image: hidden ground truth, never model input."""

    canvas_w: int
    canvas_h: int
    bbox: Box  # the tight box of the object mask
    distractor: str | None
    distractor_box: Box | None


@dataclass(frozen=True)
class Drawn:
    image: np.ndarray  # RGB uint8, (canvas_h, canvas_w, 3)
    mask: np.ndarray  # bool, True where the object was painted
    truth: ImageTruth


# ------------------------------------------------------------------------------------ background


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A light two-colour gradient in a random direction: a bilinear upscale of its 2x2 corners
    (linear across the middle, flat near the edges) costs far less than computing every pixel."""
    c1, c2 = rng.integers(185, 250, size=(2, 3))
    theta = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.cos(theta), math.sin(theta)])
    corner = np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) @ direction  # row-major 2x2 corners
    t = (corner - corner.min()) / (corner.max() - corner.min())
    corners = np.rint(c1 + (c2 - c1) * t[:, None]).astype(np.uint8).reshape(2, 2, 3)
    return cv2.resize(corners, (w, h), interpolation=cv2.INTER_LINEAR)


def _faint(rng: np.random.Generator, canvas: np.ndarray) -> tuple[int, int, int]:
    """A colour a little darker and tinted relative to the canvas: visible, but quiet."""
    ref = canvas[int(rng.integers(canvas.shape[0])), int(rng.integers(canvas.shape[1]))]
    tint = rng.integers(0, 256, 3)
    a = rng.uniform(0.2, 0.45)
    return tuple(int(v) for v in ref * (1 - a) + tint * a * 0.7)


def _clutter(rng: np.random.Generator, canvas: np.ndarray, n: int) -> None:
    """Up to `n` faint lines, shapes, squiggles, hatches and speckles drawn in place."""
    h, w = canvas.shape[:2]
    for _ in range(n):
        kind = int(rng.integers(6))
        colour = _faint(rng, canvas)
        x, y = int(rng.integers(w)), int(rng.integers(h))
        size = int(rng.integers(6, max(8, min(w, h) // 4)))
        thick = int(rng.integers(1, 3))
        if kind == 0:
            end = (int(rng.integers(w)), int(rng.integers(h)))
            cv2.line(canvas, (x, y), end, colour, thick, cv2.LINE_AA)
        elif kind == 1:
            cv2.circle(
                canvas, (x, y), size // 2, colour, -1 if rng.random() < 0.5 else thick, cv2.LINE_AA
            )
        elif kind == 2:
            cv2.rectangle(canvas, (x, y), (x + size, y + size * 2 // 3), colour, thick, cv2.LINE_AA)
        elif kind == 3:
            steps = rng.integers(-size // 2, size // 2 + 1, size=(6, 2))
            pts = np.cumsum(steps, axis=0) + np.array([x, y])
            cv2.polylines(canvas, [pts.astype(np.int32)], False, colour, thick, cv2.LINE_AA)
        elif kind == 4:
            for k in range(0, size, 4):
                cv2.line(canvas, (x + k, y), (x + k + size // 2, y + size), colour, 1, cv2.LINE_AA)
        else:
            for px, py in rng.integers(-size, size + 1, size=(12, 2)):
                cv2.circle(canvas, (x + int(px), y + int(py)), 1, colour, -1, cv2.LINE_AA)


# ---------------------------------------------------------------------------------------- object


def _object_size(
    rng: np.random.Generator, s: RenderSettings, w: int, h: int, aspect: float
) -> tuple[int, int]:
    """Box width and height whose area share lies in [fill_min, fill_max] exactly (after
    rounding), keeping the category's aspect unless the canvas is too narrow for it."""
    area = w * h
    limit = _BOX_LIMIT**2
    a = aspect * math.exp(rng.normal(0.0, 0.1))
    cap = limit * min(w / (h * a), h * a / w)  # the largest fill this aspect fits at
    if cap >= s.fill_min:
        f = rng.uniform(s.fill_min, min(s.fill_max, cap))
    else:  # stretch the shape just enough to fit the smallest allowed fill
        f = s.fill_min
        a = min(max(a, f * w / (limit * h)), limit * w / (f * h))
    max_w, max_h = int(_BOX_LIMIT * w), int(_BOX_LIMIT * h)
    bw = min(max(round(math.sqrt(f * area * a)), 1), max_w)
    bh = round(f * area / bw)
    bh = min(max(bh, math.ceil(s.fill_min * area / bw)), math.floor(s.fill_max * area / bw), max_h)
    # a no-op unless the height hit its limit: then widen to keep the fill in range
    bw = min(max(bw, math.ceil(s.fill_min * area / bh)), math.floor(s.fill_max * area / bh), max_w)
    return bw, bh


def _stripes(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, p: float) -> np.ndarray:
    theta = math.radians(pick(rng, (0, 45, 90, 135)) + rng.normal(0, 5))
    return np.mod(xx * math.cos(theta) + yy * math.sin(theta), p) < 0.42 * p


def _dots(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, p: float) -> np.ndarray:
    shifted = xx + (np.floor(yy / p) % 2) * p / 2  # offset every other row
    u, v = np.mod(shifted, p) - p / 2, np.mod(yy, p) - p / 2
    return u * u + v * v < (0.28 * p) ** 2


def _checks(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, p: float) -> np.ndarray:
    return (np.floor(xx / p) + np.floor(yy / p)) % 2 == 0


def _zigzag(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, p: float) -> np.ndarray:
    tri = np.abs(np.mod(xx / p, 1.0) - 0.5) * 2
    return np.mod(yy + 0.45 * p * tri, p) < 0.4 * p


def _flowers(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, p: float) -> np.ndarray:
    cell = 1.5 * p
    shifted = xx + (np.floor(yy / cell) % 2) * cell / 2
    u, v = np.mod(shifted, cell) - cell / 2, np.mod(yy, cell) - cell / 2
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    return r < 0.5 * p * (0.5 + 0.5 * np.abs(np.cos(2.5 * phi)))  # five petals


_PATTERN_FNS: dict[str, Callable[..., np.ndarray]] = {
    "striped": _stripes,
    "dotted": _dots,
    "checked": _checks,
    "zigzag": _zigzag,
    "floral": _flowers,
}


def _second_tone(base: np.ndarray) -> np.ndarray:
    """The pattern's other colour: a shade of the base, so the base colour still names the item."""
    luminance = base @ np.array([0.299, 0.587, 0.114])
    return base * 0.45 if luminance > 140 else base + (255 - base) * 0.7


def _paint(
    rng: np.random.Generator, mask: np.ndarray, rgb: tuple[int, int, int], pattern: str
) -> np.ndarray:
    """The object's pixels: base colour with the pattern, top lighting and a darker outline."""
    h, w = mask.shape
    base = np.clip(np.array(rgb, dtype=np.float32) + rng.integers(-12, 13, 3), 0, 255)
    img = np.empty((h, w, 3), dtype=np.float32)
    img[:] = base
    if pattern in _PATTERN_FNS:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        period = max(6.0, min(w, h) * rng.uniform(0.12, 0.2))
        img[_PATTERN_FNS[pattern](rng, xx, yy, period)] = _second_tone(base)
    img *= (1.0 + 0.12 * (0.5 - np.arange(h, dtype=np.float32) / h))[:, None, None]
    border = mask.astype(bool) & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
    img[border] = base * 0.55
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ distractor


def _overlap(a: Box, b: Box) -> int:
    dx = min(a[2], b[2]) - max(a[0], b[0])
    dy = min(a[3], b[3]) - max(a[1], b[1])
    return max(dx, 0) * max(dy, 0)


def _text_scale(text: str, width: float, thickness: int) -> float:
    """The font scale at which `text` is `width` pixels wide."""
    (tw, _), _ = cv2.getTextSize(text, _FONT, 1.0, thickness)
    return max(width / max(tw, 1), 0.2)


def _distractor_extent(
    rng: np.random.Generator, kind: str, w: int, h: int
) -> tuple[int, int, str, float]:
    """(width, height, text, font scale) of a distractor before it is placed."""
    side = min(w, h) * rng.uniform(0.14, 0.22)
    if kind == "logo":
        text = pick(rng, BRANDS)[:2].upper()
        return int(side), int(side), text, _text_scale(text, side * 0.6, 1)
    if kind == "price_tag":
        text = f"${int(rng.integers(5, 200))}.{pick(rng, ('99', '49', '00'))}"
        return int(side * 1.7), int(side * 0.75), text, _text_scale(text, side * 1.1, 1)
    text = pick(rng, ("SAMPLE", f"{pick(rng, BRANDS).lower()}.com", "shop.example", "PREVIEW"))
    scale = _text_scale(text, w * rng.uniform(0.3, 0.5), 1)
    (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, 1)
    return tw, th + baseline, text, scale


def _place(rng: np.random.Generator, dw: int, dh: int, w: int, h: int, avoid: Box) -> Box:
    """Of a few random spots for a dw x dh box, the first that overlaps `avoid` least."""
    xs = rng.integers(0, max(w - dw, 0) + 1, size=40)
    ys = rng.integers(0, max(h - dh, 0) + 1, size=40)
    boxes = [
        (int(x), int(y), min(int(x) + dw, w), min(int(y) + dh, h))
        for x, y in zip(xs, ys, strict=True)
    ]
    return min(boxes, key=lambda box: _overlap(box, avoid))


def _draw_distractor(rng: np.random.Generator, canvas: np.ndarray, kind: str, avoid: Box) -> Box:
    """Draw a logo, price tag or watermark away from the object; return its box."""
    h, w = canvas.shape[:2]
    dw, dh, text, scale = _distractor_extent(rng, kind, w, h)
    for _ in range(3):  # shrink if no free spot exists (a large object in a small canvas)
        box = _place(rng, dw, dh, w, h, avoid)
        if _overlap(box, avoid) <= 0.05 * dw * dh:
            break
        dw, dh, scale = int(dw * 0.7), int(dh * 0.7), scale * 0.7
    x0, y0, x1, y1 = box
    colour = tuple(int(v) for v in pick(rng, COLOURS).rgb)
    ink = (250, 250, 250) if sum(colour) < 450 else (20, 20, 20)
    if kind == "logo":
        cx, cy, r = (x0 + x1) // 2, (y0 + y1) // 2, max((x1 - x0) // 2, 2)
        if rng.random() < 0.5:
            cv2.circle(canvas, (cx, cy), r, colour, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), colour, -1, cv2.LINE_AA)
        (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
        cv2.putText(canvas, text, (cx - tw // 2, cy + th // 2), _FONT, scale, ink, 1, cv2.LINE_AA)
    elif kind == "price_tag":
        point = (x1 - x0) // 5
        mid = (y0 + y1) // 2
        tag = np.array(
            [(x0, mid), (x0 + point, y0), (x1 - 1, y0), (x1 - 1, y1 - 1), (x0 + point, y1 - 1)],
            dtype=np.int32,
        )
        cv2.fillPoly(canvas, [tag], colour, cv2.LINE_AA)
        cv2.circle(canvas, (x0 + point // 2 + 2, mid), max(point // 5, 1), (245, 245, 245), -1)
        (_, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
        cv2.putText(
            canvas, text, (x0 + point + 2, mid + th // 2), _FONT, scale, ink, 1, cv2.LINE_AA
        )
    else:  # a semi-transparent watermark
        layer = canvas.copy()
        cv2.putText(
            layer, text, (x0, y1 - 1 - (y1 - y0) // 4), _FONT, scale, (90, 90, 90), 1, cv2.LINE_AA
        )
        cv2.addWeighted(layer, 0.45, canvas, 0.55, 0, dst=canvas)
    return box


# ------------------------------------------------------------------------------------- one image


def draw_product(
    s: RenderSettings, index: int, category: str, aspect: float, colour: int, pattern: int
) -> Drawn:
    """Draw product `index` (colour and pattern are indices into COLOURS and PATTERNS)."""
    rng = rng_for(s.seed, Purpose.IMAGE, index)
    w = int(rng.integers(s.canvas_min, s.canvas_max + 1))
    h = int(rng.integers(s.canvas_min, s.canvas_max + 1))
    canvas = _background(rng, w, h)
    _clutter(rng, canvas, int(rng.integers(0, s.clutter_shapes + 1)))

    bw, bh = _object_size(rng, s, w, h, aspect)
    local = rasterize(category, bw, bh)
    rows, cols = np.flatnonzero(local.any(axis=1)), np.flatnonzero(local.any(axis=0))
    local = local[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # tight, whatever the shape
    oh, ow = local.shape
    x0, y0 = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
    pixels = _paint(rng, local, COLOURS[colour].rgb, PATTERNS[pattern].name)
    on = local.astype(bool)
    canvas[y0 : y0 + oh, x0 : x0 + ow][on] = pixels[on]
    mask = np.zeros((h, w), dtype=bool)
    mask[y0 : y0 + oh, x0 : x0 + ow] = on
    bbox = (x0, y0, x0 + ow, y0 + oh)

    kind, dbox = None, None
    if rng.random() < s.distractor_share:
        kind = pick(rng, DISTRACTOR_KINDS)
        dbox = _draw_distractor(rng, canvas, kind, bbox)
    return Drawn(canvas, mask, ImageTruth(w, h, bbox, kind, dbox))


def encode_jpeg(rgb: np.ndarray) -> bytes:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


# ---------------------------------------------------------------------------------- all images


@dataclass(frozen=True)
class _Chunk:
    settings: RenderSettings
    indices: np.ndarray
    categories: tuple[str, ...]
    aspects: tuple[float, ...]
    colours: np.ndarray
    patterns: np.ndarray
    paths: tuple[Path, ...]


def _draw_chunk(chunk: _Chunk) -> list[ImageTruth]:
    truths = []
    for k, index in enumerate(chunk.indices):
        drawn = draw_product(
            chunk.settings,
            int(index),
            chunk.categories[k],
            chunk.aspects[k],
            int(chunk.colours[k]),
            int(chunk.patterns[k]),
        )
        chunk.paths[k].write_bytes(encode_jpeg(drawn.image))
        truths.append(drawn.truth)
    return truths


def _chunks(
    settings: RenderSettings, catalog: Catalog, paths: list[Path], first_index: int
) -> Iterator[_Chunk]:
    for start in range(0, len(catalog), _CHUNK):
        sl = slice(start, start + _CHUNK)
        cats = [catalog.categories[c] for c in catalog.category[sl]]
        yield _Chunk(
            settings,
            first_index + np.arange(start, min(start + _CHUNK, len(catalog))),
            tuple(c.name for c in cats),
            tuple(c.aspect for c in cats),
            catalog.colour[sl],
            catalog.pattern[sl],
            tuple(paths[sl]),
        )


def _context() -> BaseContext:
    """fork where the OS has it: spawn and forkserver re-import the caller's __main__, which
    breaks any script that calls generate_world without an `if __name__ == "__main__"` guard."""
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


def draw_images(
    cfg: SynthConfig,
    catalog: Catalog,
    paths: list[Path],
    progress: bool = True,
    first_index: int = 0,
) -> list[ImageTruth]:
    """Draw and write every product's JPEG to `paths` using `cfg.workers` processes.

    Product i is drawn from the stream of index `first_index + i`: products appended to a world
    later pass the catalogue size so far, and never repeat an earlier product's stream."""
    settings = RenderSettings.from_config(cfg)
    chunks = _chunks(settings, catalog, paths, first_index)
    truths: list[ImageTruth] = []
    pool = nullcontext() if cfg.workers == 1 else _context().Pool(cfg.workers)
    bar = tqdm(total=len(catalog), desc="drawing images", unit="img", disable=not progress)
    with bar, pool as workers:
        results = map(_draw_chunk, chunks) if workers is None else workers.imap(_draw_chunk, chunks)
        for chunk_truths in results:
            truths.extend(chunk_truths)
            bar.update(len(chunk_truths))
    return truths
