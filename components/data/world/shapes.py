"""Category silhouettes: each category is a few polygons and ellipses in a unit box.

Coordinates are (x, y) in [0, 1] with y pointing down. Every silhouette touches all four sides
of the unit box, so the drawn mask fills the box it is scaled to and the object's tight bounding
box is the box that was asked for. Parts with `keep=False` cut holes (a mug's handle, a neckline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

_SHIFT = 4  # fractional bits: sub-pixel vertex precision, so small objects keep their shape
_ONE = 1 << _SHIFT

Point = tuple[float, float]


@dataclass(frozen=True)
class Poly:
    points: tuple[Point, ...]
    keep: bool = True


@dataclass(frozen=True)
class Ellipse:
    center: Point
    axes: Point  # half-width, half-height
    start: float = 0.0  # degrees, clockwise from +x (OpenCV's convention, y down)
    end: float = 360.0
    keep: bool = True


Part = Poly | Ellipse


def _rect(x0: float, y0: float, x1: float, y1: float, keep: bool = True) -> Poly:
    return Poly(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), keep)


def _ring(center: Point, outer: Point, inner: Point, start: float = 0, end: float = 360) -> list:
    """A handle or loop: an ellipse with an elliptic hole."""
    return [Ellipse(center, outer, start, end), Ellipse(center, inner, start, end, keep=False)]


# fmt: off
SILHOUETTES: dict[str, tuple[Part, ...]] = {
    "dress": (
        _rect(0.30, 0.0, 0.38, 0.14),
        _rect(0.62, 0.0, 0.70, 0.14),
        Poly(((0.28, 0.10), (0.72, 0.10), (0.66, 0.38), (0.34, 0.38))),
        Poly(((0.34, 0.36), (0.66, 0.36), (1.0, 1.0), (0.0, 1.0))),
    ),
    "t-shirt": (
        Poly(((0.33, 0.0), (0.67, 0.0), (1.0, 0.2), (0.87, 0.42), (0.76, 0.34), (0.76, 1.0),
              (0.24, 1.0), (0.24, 0.34), (0.13, 0.42), (0.0, 0.2))),
        Ellipse((0.5, 0.0), (0.12, 0.09), 0, 180, keep=False),
    ),
    "trousers": (Poly(((0.04, 0.0), (0.96, 0.0), (1.0, 1.0), (0.58, 1.0), (0.5, 0.3), (0.42, 1.0),
                       (0.0, 1.0))),),
    "skirt": (
        _rect(0.22, 0.0, 0.78, 0.1),
        Poly(((0.22, 0.08), (0.78, 0.08), (1.0, 1.0), (0.0, 1.0))),
    ),
    "shorts": (
        _rect(0.0, 0.0, 1.0, 0.14),
        Poly(((0.0, 0.12), (1.0, 0.12), (1.0, 1.0), (0.57, 1.0), (0.5, 0.5), (0.43, 1.0),
              (0.0, 1.0))),
    ),
    "jacket": (
        Poly(((0.32, 0.0), (0.68, 0.0), (0.9, 0.08), (1.0, 0.95), (0.84, 0.97), (0.78, 0.35),
              (0.78, 1.0), (0.22, 1.0), (0.22, 0.35), (0.16, 0.97), (0.0, 0.95), (0.1, 0.08))),
        Poly(((0.42, 0.0), (0.58, 0.0), (0.5, 0.32)), keep=False),
        _rect(0.49, 0.32, 0.51, 1.0, keep=False),
    ),
    "shoe": (Poly(((0.0, 0.5), (0.04, 0.12), (0.3, 0.0), (0.4, 0.3), (0.72, 0.45), (0.95, 0.62),
                   (1.0, 0.82), (1.0, 1.0), (0.0, 1.0))),),
    "boot": (
        Poly(((0.08, 0.0), (0.58, 0.0), (0.6, 0.55), (0.9, 0.66), (1.0, 0.82), (1.0, 0.9),
              (0.0, 0.9), (0.04, 0.6))),
        _rect(0.0, 0.88, 0.3, 1.0),
        _rect(0.55, 0.88, 1.0, 1.0),
    ),
    "sock": (
        _rect(0.0, 0.0, 0.52, 0.12),
        _rect(0.03, 0.1, 0.5, 0.65),
        Poly(((0.03, 0.6), (0.5, 0.55), (0.8, 0.68), (0.8, 1.0), (0.25, 1.0), (0.03, 0.85))),
        Ellipse((0.8, 0.84), (0.2, 0.16)),
    ),
    "glove": (
        _rect(0.22, 0.45, 1.0, 1.0),
        *(Ellipse((0.305 + i * 0.2, 0.3 + top), (0.085, 0.3 - top)) for i, top in
          enumerate((0.06, 0.0, 0.03, 0.12))),
        *(_rect(0.22 + i * 0.2, 0.3 + top, 0.39 + i * 0.2, 0.5) for i, top in
          enumerate((0.06, 0.0, 0.03, 0.12))),
        Poly(((0.22, 0.6), (0.0, 0.32), (0.09, 0.26), (0.32, 0.5))),
    ),
    "hat": (
        Ellipse((0.5, 0.85), (0.5, 0.15)),
        Ellipse((0.5, 0.78), (0.3, 0.78), 180, 360),
    ),
    "scarf": (
        *_ring((0.5, 0.2), (0.5, 0.2), (0.32, 0.1)),
        Poly(((0.3, 0.3), (0.52, 0.3), (0.48, 0.92), (0.26, 0.92))),
        Poly(((0.5, 0.3), (0.7, 0.3), (0.78, 0.92), (0.58, 0.92))),
        *(_rect(x, 0.9, x + 0.025, 1.0) for x in (0.26, 0.32, 0.38, 0.445, 0.58, 0.64, 0.7, 0.755)),
    ),
    "bag": (
        *_ring((0.5, 0.38), (0.3, 0.38), (0.22, 0.28), 180, 360),
        Poly(((0.06, 0.36), (0.94, 0.36), (1.0, 1.0), (0.0, 1.0))),
    ),
    "backpack": (
        *_ring((0.5, 0.1), (0.12, 0.1), (0.07, 0.06)),
        Ellipse((0.5, 0.32), (0.5, 0.16)),
        _rect(0.0, 0.32, 1.0, 1.0),
        _rect(0.2, 0.58, 0.8, 0.6, keep=False),
    ),
    "watch": (
        _rect(0.25, 0.0, 0.75, 1.0),
        Ellipse((0.5, 0.5), (0.5, 0.23)),
        Ellipse((0.5, 0.5), (0.36, 0.165), keep=False),
        Ellipse((0.5, 0.5), (0.3, 0.135)),
    ),
    "sunglasses": (
        _rect(0.02, 0.0, 0.98, 0.14),
        Ellipse((0.22, 0.55), (0.22, 0.45)),
        Ellipse((0.78, 0.55), (0.22, 0.45)),
        _rect(0.4, 0.3, 0.6, 0.42),
    ),
    "umbrella": (
        Ellipse((0.5, 0.5), (0.5, 0.5), 180, 360),
        *(Ellipse((x, 0.5), (0.1, 0.06), 180, 360, keep=False) for x in (0.27, 0.5, 0.73)),
        _rect(0.48, 0.44, 0.52, 0.9),
        *_ring((0.41, 0.88), (0.11, 0.12), (0.065, 0.07), 0, 180),
    ),
    "mug": (
        *_ring((0.74, 0.5), (0.26, 0.3), (0.15, 0.18)),
        _rect(0.0, 0.0, 0.76, 1.0),
    ),
    "teapot": (
        *_ring((0.2, 0.58), (0.2, 0.25), (0.12, 0.15)),
        Ellipse((0.5, 0.62), (0.32, 0.38)),
        Poly(((0.7, 0.6), (0.76, 0.45), (1.0, 0.2), (1.0, 0.3), (0.82, 0.75))),
        Ellipse((0.5, 0.25), (0.15, 0.06)),
        Ellipse((0.5, 0.12), (0.05, 0.12)),
    ),
    "bottle": (
        _rect(0.36, 0.0, 0.64, 0.1),
        _rect(0.38, 0.08, 0.62, 0.3),
        Poly(((0.38, 0.28), (0.62, 0.28), (1.0, 0.46), (0.0, 0.46))),
        _rect(0.0, 0.45, 1.0, 1.0),
    ),
    "vase": (
        _rect(0.28, 0.0, 0.72, 0.06),
        Poly(((0.34, 0.05), (0.66, 0.05), (0.6, 0.32), (0.4, 0.32))),
        Ellipse((0.5, 0.62), (0.5, 0.38)),
    ),
    "lamp": (
        Poly(((0.26, 0.0), (0.74, 0.0), (1.0, 0.42), (0.0, 0.42))),
        _rect(0.46, 0.42, 0.54, 0.9),
        Ellipse((0.5, 0.93), (0.32, 0.07)),
    ),
    "chair": (
        _rect(0.05, 0.0, 0.95, 0.1),
        _rect(0.05, 0.0, 0.17, 1.0),
        _rect(0.83, 0.0, 0.95, 1.0),
        _rect(0.05, 0.25, 0.95, 0.32),
        _rect(0.0, 0.5, 1.0, 0.62),
        _rect(0.05, 0.85, 0.95, 0.9),
    ),
    "sofa": (
        Ellipse((0.5, 0.12), (0.42, 0.12)),
        _rect(0.08, 0.12, 0.92, 0.55),
        _rect(0.0, 0.45, 1.0, 0.88),
        Ellipse((0.07, 0.42), (0.07, 0.1)),
        Ellipse((0.93, 0.42), (0.07, 0.1)),
        _rect(0.05, 0.86, 0.1, 1.0),
        _rect(0.9, 0.86, 0.95, 1.0),
    ),
    "table": (
        _rect(0.0, 0.0, 1.0, 0.12),
        _rect(0.05, 0.12, 0.95, 0.22),
        _rect(0.06, 0.12, 0.14, 1.0),
        _rect(0.86, 0.12, 0.94, 1.0),
    ),
    "pillow": (Poly(((0.0, 0.0), (0.5, 0.1), (1.0, 0.0), (0.9, 0.5), (1.0, 1.0), (0.5, 0.9),
                     (0.0, 1.0), (0.1, 0.5))),),
    "clock": (
        Ellipse((0.22, 0.14), (0.22, 0.14)),
        Ellipse((0.78, 0.14), (0.22, 0.14)),
        _rect(0.2, 0.85, 0.3, 1.0),
        _rect(0.7, 0.85, 0.8, 1.0),
        Ellipse((0.5, 0.55), (0.42, 0.4)),
    ),
}
# fmt: on


def _scaled(points: Sequence[Point], w: int, h: int) -> np.ndarray:
    """Unit-box points -> fixed-point pixel coordinates spanning pixel centres 0..w-1, 0..h-1."""
    pts = np.asarray(points, dtype=np.float64) * (w - 1, h - 1) * _ONE
    return np.round(pts).astype(np.int32)


def rasterize(category: str, w: int, h: int) -> np.ndarray:
    """The category's silhouette as a uint8 mask (1 = object) of shape (h, w)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for part in SILHOUETTES[category]:
        value = 1 if part.keep else 0
        if isinstance(part, Poly):
            cv2.fillPoly(mask, [_scaled(part.points, w, h)], value, cv2.LINE_8, _SHIFT)
        else:
            center = _scaled([part.center], w, h)[0]
            axes = _scaled([part.axes], w, h)[0]
            cv2.ellipse(mask, center, axes, 0, part.start, part.end, value, -1, cv2.LINE_8, _SHIFT)
    return mask
