"""3D anomaly map: group-centre scores -> foreground points -> pixel grid -> Gaussian blur (MuSc-V2, ``muscv2.py``).

Points get the 3-NN inverse-squared-distance average of the centre scores (PointNet++ feature
propagation, ``w = 1 / (d^2 + 1e-8)``), are scattered to their pixels (background 0) and the map is blurred
with sigma 4 (PIL ``GaussianBlur(4)`` in the official code; ``cv2.GaussianBlur`` here). The official code
also quantises the map to 8 bits (map / max -> uint8 -> blur -> * max); that only changes ties and is
off by default (``quantise=True`` reproduces it).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial import cKDTree

DEFAULT_SIGMA = 4.0
PROPAGATION_NEIGHBOURS = 3


@dataclass(frozen=True)
class Propagation:
    """Precomputed centre-to-point interpolation of one sample."""

    index: np.ndarray      # [N, k] nearest centres of each foreground point
    weight: np.ndarray     # [N, k] normalised inverse-squared-distance weights
    pixel_ids: np.ndarray  # [N] raster pixel of each point in the size x size grid
    size: int


def propagation(points: np.ndarray, pixel_ids: np.ndarray, centres: np.ndarray, size: int,
                k: int = PROPAGATION_NEIGHBOURS) -> Propagation:
    """Interpolation weights from ``centres [G, 3]`` to foreground ``points [N, 3]``."""
    if points.shape[0] != pixel_ids.shape[0]:
        raise ValueError(f"{points.shape[0]} points but {pixel_ids.shape[0]} pixel ids")
    k = min(k, centres.shape[0])
    dist, index = cKDTree(centres).query(points, k=k)
    dist, index = dist.reshape(len(points), k), index.reshape(len(points), k)
    weight = 1.0 / (dist ** 2 + 1e-8)
    weight /= weight.sum(axis=1, keepdims=True)
    return Propagation(index, weight.astype(np.float32), np.asarray(pixel_ids, dtype=np.int64), size)


def centre_map(scores: np.ndarray, prop: Propagation, sigma: float = DEFAULT_SIGMA,
               quantise: bool = False) -> np.ndarray:
    """``[size, size]`` float32 pixel map of per-centre ``scores [G]``."""
    grid = np.zeros(prop.size * prop.size, dtype=np.float32)
    grid[prop.pixel_ids] = (scores[prop.index] * prop.weight).sum(axis=1)
    grid = grid.reshape(prop.size, prop.size)
    if sigma <= 0:
        return grid
    if not quantise:
        return cv2.GaussianBlur(grid, (0, 0), sigmaX=sigma)
    peak = float(grid.max())
    if peak <= 0:
        return grid
    levels = (grid / peak * 255.0).astype(np.uint8)
    return cv2.GaussianBlur(levels, (0, 0), sigmaX=sigma).astype(np.float32) / 255.0 * peak
