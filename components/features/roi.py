"""Find the product object in an image by edge detection (paper 2.1: "object-level RoI").

Pipeline: pad the image with its border colour (so an object touching the canvas edge still has an
outline), blur, Canny on each Lab channel (colour edges count, not only brightness), dilate so the
outline and pattern strokes of one object join, then take connected components and score each by
the area of its convex hull. Hull area, not pixel area, is what makes this robust: a long clutter
line or a hollow outline has few pixels, but only an object encloses a large hull; a logo, price
tag or watermark encloses a small one. Components of comparable hull area that touch the winner's
box join it (an object whose outline broke into pieces). Finally the box is trimmed from each side
while a row or column crosses fewer than two edge runs: a stray line poking out of the object
crosses once, an object's outline at least twice.

When no component is large enough the whole image is the RoI and the fallback is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from components.config import RoiConfig

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class Roi:
    box: Box
    fallback: bool  # nothing credible was found: the whole image


_PAD = 4


def _edge_map(image_bgr: np.ndarray, cfg: RoiConfig) -> np.ndarray:
    border = np.concatenate([image_bgr[0], image_bgr[-1], image_bgr[:, 0], image_bgr[:, -1]])
    background = np.median(border, axis=0).astype(np.uint8).tolist()
    padded = cv2.copyMakeBorder(image_bgr, *(_PAD,) * 4, cv2.BORDER_CONSTANT, value=background)
    lab = cv2.cvtColor(cv2.GaussianBlur(padded, (5, 5), 0), cv2.COLOR_BGR2LAB)
    edges = np.zeros(lab.shape[:2], np.uint8)
    for channel in range(3):
        edges |= cv2.Canny(lab[:, :, channel], cfg.canny_low, cfg.canny_high)
    return edges[_PAD:-_PAD, _PAD:-_PAD]


def _runs(mask: np.ndarray) -> np.ndarray:
    """Per row of a boolean mask, how many separate runs of True it holds."""
    starts = np.diff(mask.astype(np.int8), axis=1) == 1
    return starts.sum(axis=1) + mask[:, 0]


def _trim(edges: np.ndarray, box: Box, min_runs: int) -> Box:
    x0, y0, x1, y1 = box
    inside = edges[y0:y1, x0:x1] > 0
    rows = np.flatnonzero(_runs(inside) >= min_runs)
    cols = np.flatnonzero(_runs(inside.T) >= min_runs)
    if rows.size == 0 or cols.size == 0:
        return box
    return x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1


def _near(a: Box, b: Box, gap: float) -> bool:
    return b[0] <= a[2] + gap and b[2] >= a[0] - gap and b[1] <= a[3] + gap and b[3] >= a[1] - gap


def detect_roi(image_bgr: np.ndarray, cfg: RoiConfig | None = None) -> Roi:
    """The object's box in a BGR uint8 image (see the module docstring for how)."""
    cfg = cfg or RoiConfig()
    h, w = image_bgr.shape[:2]
    edges = _edge_map(image_bgr, cfg)
    k = max(3, int(cfg.join_frac * min(h, w)) | 1)
    joined = cv2.dilate(edges, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(joined)

    candidates: list[tuple[float, int, Box]] = []
    for i in range(1, n):
        x, y, bw, bh, _ = stats[i]
        if bw * bh < cfg.min_area_frac * w * h:  # the hull cannot exceed the box
            continue
        points = cv2.findNonZero((labels[y : y + bh, x : x + bw] == i).astype(np.uint8))
        hull = cv2.contourArea(cv2.convexHull(points))
        if hull >= cfg.min_area_frac * w * h:
            candidates.append((hull, i, (int(x), int(y), int(x + bw), int(y + bh))))
    if not candidates:
        return Roi((0, 0, w, h), fallback=True)

    candidates.sort(key=lambda c: -c[0])
    best_hull, best_label, box = candidates[0]
    members = [best_label]
    for hull, label, other in candidates[1:]:
        gap = cfg.merge_gap * max(box[2] - box[0], box[3] - box[1])
        if hull >= cfg.merge_rel * best_hull and _near(box, other, gap):
            box = (
                min(box[0], other[0]),
                min(box[1], other[1]),
                max(box[2], other[2]),
                max(box[3], other[3]),
            )
            members.append(label)
    own_edges = np.where(np.isin(labels, members), edges, 0)
    x0, y0, x1, y1 = _trim(own_edges, box, cfg.min_runs)
    m = cfg.margin
    return Roi((max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)), fallback=False)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grid_boxes(box: Box, grid: int) -> list[Box]:
    """Cut a box into grid x grid patches, row-major (the order of the patch tokens)."""
    x0, y0, x1, y1 = box
    xs = np.linspace(x0, x1, grid + 1).round().astype(int)
    ys = np.linspace(y0, y1, grid + 1).round().astype(int)
    return [
        (int(xs[c]), int(ys[r]), int(max(xs[c + 1], xs[c] + 1)), int(max(ys[r + 1], ys[r] + 1)))
        for r in range(grid)
        for c in range(grid)
    ]
