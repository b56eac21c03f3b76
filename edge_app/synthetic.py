"""Seeded synthetic inspection parts (no licensed data needed): a round machined part seen from above,
with occasional scratches, stains and chipped rims, plus pixel-exact ground-truth masks.

``generate_set`` writes an MVTec-AD-style tree, so everything that reads real data reads this too.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import UsageError

DEFECT_KINDS = ("scratch", "stain", "chip")


def _base_part(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.normal(0, size * 0.01, 2)
    radius = size * (0.36 + rng.normal(0, 0.004))
    r = np.hypot(xx - centre[0], yy - centre[1]) / radius
    image = np.full((size, size, 3), (58, 62, 66), np.float32)  # dark conveyor belt
    disc = r < 1.0
    shade = 150 + 60 * np.cos(np.clip(r, 0, 1) * np.pi / 2)  # brushed dome
    for c, tint in enumerate((1.0, 0.97, 0.9)):
        image[..., c][disc] = (shade * tint)[disc]
    ring = (r > 0.55) & (r < 0.62)
    image[ring] *= 0.72
    hub = r < 0.18
    image[hub] = (95, 98, 104)
    angle = rng.uniform(0, 2 * np.pi)
    for k in range(4):  # four bolt holes, at a random rotation (the scorer is position-free)
        a = angle + k * np.pi / 2
        hx, hy = centre[0] + 0.38 * radius * np.cos(a), centre[1] + 0.38 * radius * np.sin(a)
        cv2.circle(image, (int(hx), int(hy)), max(2, int(size * 0.028)), (40, 42, 45), -1, cv2.LINE_AA)
    image += rng.normal(0, 3.0, image.shape).astype(np.float32)  # sensor noise
    return image


def _add_defect(image: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    size = image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    c = size / 2
    if kind == "scratch":
        a = rng.uniform(0, np.pi)
        length = size * rng.uniform(0.12, 0.22)
        x0, y0 = c + rng.uniform(-0.18, 0.18) * size, c + rng.uniform(-0.18, 0.18) * size
        p0 = (int(x0 - length / 2 * np.cos(a)), int(y0 - length / 2 * np.sin(a)))
        p1 = (int(x0 + length / 2 * np.cos(a)), int(y0 + length / 2 * np.sin(a)))
        width = max(2, int(size * 0.012))
        cv2.line(mask, p0, p1, 1, width)
        image[mask > 0] = (30, 28, 26)
    elif kind == "stain":
        x, y = c + rng.uniform(-0.2, 0.2) * size, c + rng.uniform(-0.2, 0.2) * size
        axes = (int(size * rng.uniform(0.03, 0.06)), int(size * rng.uniform(0.02, 0.05)))
        cv2.ellipse(mask, (int(x), int(y)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
        image[mask > 0] = image[mask > 0] * 0.35 + np.array((150, 95, 20), np.float32) * 0.65
    elif kind == "chip":
        a = rng.uniform(0, 2 * np.pi)
        rim = size * 0.36
        x, y = c + rim * np.cos(a), c + rim * np.sin(a)
        cv2.circle(mask, (int(x), int(y)), int(size * rng.uniform(0.05, 0.08)), 1, -1)
        disc = np.zeros_like(mask)
        cv2.circle(disc, (int(c), int(c)), int(rim), 1, -1)
        mask &= disc
        image[mask > 0] = (58, 62, 66)
    else:
        raise ValueError(f"unknown defect kind {kind!r}: expected one of {DEFECT_KINDS}")
    return mask


def render_part(rng: np.random.Generator, size: int = 256, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 part and its boolean defect mask (all False for a good part)."""
    image = _base_part(rng, size)
    mask = _add_defect(image, rng, defect) if defect else np.zeros((size, size), np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(bool)


def generate_set(root: str | Path, n: int = 48, defect_fraction: float = 0.25, seed: int = 0,
                 size: int = 256) -> Path:
    """Write ``n`` parts as an MVTec-AD-style category under ``root`` and return ``root``."""
    if n < 2:
        raise UsageError(f"a synthetic set needs at least 2 parts, got {n}")
    if not 0.0 <= defect_fraction < 1.0:
        raise UsageError(f"defect_fraction must be in [0, 1), got {defect_fraction}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_bad = int(round(n * defect_fraction))
    kinds = [None] * (n - n_bad) + [DEFECT_KINDS[i % len(DEFECT_KINDS)] for i in range(n_bad)]
    counters: dict[str, int] = {}
    for kind in kinds:
        folder = kind or "good"
        index = counters.get(folder, 0)
        counters[folder] = index + 1
        image, mask = render_part(rng, size, kind)
        out = root / "test" / folder
        out.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / f"{index:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if kind:
            gt = root / "ground_truth" / kind
            gt.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(gt / f"{index:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root
