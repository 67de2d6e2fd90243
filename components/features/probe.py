"""A linear probe of image features: synthetic colour x shape crops, and a cross-validated probe.

How much a backbone's features tell colour and shape apart (benchmarks/bench_backbone_probe.py
compares the pretrained EfficientNet-Lite0 with random weights; a test keeps that ordering).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

COLOURS = {
    "red": (215, 45, 40),
    "green": (45, 160, 60),
    "blue": (45, 80, 215),
    "yellow": (225, 200, 45),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ("light", "coloured")
FOLDS = 5


def _background(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    if kind == "light":  # the world's canvases: light, barely tinted, a few faint strokes
        base = rng.integers(200, 246) + rng.integers(-12, 13, size=3)
        noise = 12.0
    else:  # any mid colour: the object's colour no longer stands out from a neutral canvas
        base = rng.integers(60, 200, size=3)
        noise = 20.0
    img = np.clip(base + rng.normal(0.0, noise, size=(h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(0, 4)):
        tone = tuple(int(v) for v in np.clip(base - rng.integers(15, 40), 0, 255))
        p0, p1 = (tuple(int(v) for v in rng.integers(0, (w, h))) for _ in range(2))
        cv2.line(img, p0, p1, tone, int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _draw(rng: np.random.Generator, shape: str, rgb: tuple[int, int, int], kind: str) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(40, 101, size=2))  # odd and even sides, any aspect
    img = _background(rng, h, w, kind)
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in rgb)
    r = rng.uniform(0.25, 0.42) * min(h, w)
    cx, cy, angle = rng.uniform(r, w - r), rng.uniform(r, h - r), rng.uniform(0, 2 * np.pi)

    def ring(n: int, phase: float = 0.0) -> np.ndarray:
        t = angle + phase + np.arange(n) * 2 * np.pi / n
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1).round().astype(np.int32)

    if shape == "circle":
        cv2.circle(img, (round(cx), round(cy)), round(r), colour, -1, cv2.LINE_AA)
    elif shape in ("square", "triangle"):
        cv2.fillPoly(img, [ring(4 if shape == "square" else 3)], colour, cv2.LINE_AA)
    else:  # a cross: two thick bars through the centre
        for a, b in (ring(2), ring(2, np.pi / 2)):
            cv2.line(img, tuple(map(int, a)), tuple(map(int, b)), colour, max(2, round(r / 3)))
    return img


def make_shapes(
    per_class: int, seed: int, background: str = "light"
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """`per_class` RGB crops of each colour x shape, and their colour, shape and joint labels."""
    rng = np.random.default_rng(seed)
    images, colour, shape = [], [], []
    for ci, rgb in enumerate(COLOURS.values()):
        for si, name in enumerate(SHAPES):
            images += [_draw(rng, name, rgb, background) for _ in range(per_class)]
            colour += [ci] * per_class
            shape += [si] * per_class
    c, s = np.array(colour), np.array(shape)
    return images, {"colour": c, "shape": s, "colour+shape": c * len(SHAPES) + s}


def probe_accuracy(features: np.ndarray | torch.Tensor, labels: np.ndarray, seed: int = 0) -> float:
    """Mean 5-fold cross-validated accuracy of a standardised logistic-regression probe."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    # One BLAS thread: beside torch's OpenMP pool, multi-threaded OpenBLAS oversubscribes the
    # two cores and the same fit runs 20-50x slower.
    with threadpool_limits(1):
        return float(cross_val_score(probe, np.asarray(features), labels, cv=folds).mean())
