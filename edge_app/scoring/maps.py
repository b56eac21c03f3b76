"""Anomaly-map utilities: bilinear upsampling (align_corners=True) and image scores."""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=32)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` linear interpolation weights with corners aligned."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    if n_in == 1:
        m[:, 0] = 1.0
        return m
    pos = np.linspace(0.0, n_in - 1, n_out)
    left = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = (pos - left).astype(np.float32)
    rows = np.arange(n_out)
    m[rows, left] = 1.0 - frac
    m[rows, left + 1] = frac
    m.setflags(write=False)
    return m


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (align_corners=True) upsampling of ``[..., h, w]`` maps to ``[..., H, W]``."""
    h, w = maps.shape[-2:]
    ry = _interp_matrix(size[0], h)
    rx = _interp_matrix(size[1], w)
    return ry @ maps.astype(np.float32, copy=False) @ rx.T


def image_scores(patch_maps: np.ndarray, top: int = 1) -> np.ndarray:
    """Max of each map (``top`` 1), or the mean of its ``top`` highest patch scores. For bilinear align-corners
    upsampling the max of the full-resolution map is attained on the patch grid, so the max equals the max of
    the upsampled map without computing it."""
    flat = patch_maps.reshape(patch_maps.shape[0], -1)
    if top <= 1:
        return flat.max(axis=1)
    top = min(top, flat.shape[1])
    return np.partition(flat, flat.shape[1] - top, axis=1)[:, flat.shape[1] - top:].mean(axis=1)
