"""Patch-feature aggregation: LNAMD (MuSc) and SNAMD with similarity-weighted pooling (MuSc-V2).

Inputs are token grids ``[N, h, w, D]`` (one layer, CLS removed). Outputs are unit-norm feature sets
``[N, h*w, D]`` ready for mutual scoring. Pure numpy; MuSc's LNAMD (``_LNAMD.py``), MuSc-V2's SNAMD (``_SNAMD.py``).
"""
from __future__ import annotations

import numpy as np

DEFAULT_DEGREES = (1, 3, 5)


def l2_normalise(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Unit vectors along ``axis`` (zero vectors stay zero)."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def map_layer_norm(grid: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Per-image LayerNorm over (h, w, D) jointly, no affine (MuSc V1; *not* per-token)."""
    axes = tuple(range(1, grid.ndim))
    mean = grid.mean(axis=axes, keepdims=True)
    var = grid.var(axis=axes, keepdims=True)
    return (grid - mean) / np.sqrt(var + eps)


def box_mean(grid: np.ndarray, r: int) -> np.ndarray:
    """r x r window mean with zero padding; the zeros count in the 1/r^2 divisor."""
    if r == 1:
        return grid
    half = r // 2
    n, h, w, d = grid.shape
    padded = np.zeros((n, h + 2 * half + 1, w + 2 * half + 1, d), dtype=np.float64)
    padded[:, half + 1:half + 1 + h, half + 1:half + 1 + w] = grid
    integral = padded.cumsum(axis=1).cumsum(axis=2)
    total = (integral[:, r:r + h, r:r + w] - integral[:, 0:h, r:r + w]
             - integral[:, r:r + h, 0:w] + integral[:, 0:h, 0:w])
    return (total / (r * r)).astype(grid.dtype)


def lnamd(grid: np.ndarray, degrees: tuple[int, ...] = DEFAULT_DEGREES) -> list[np.ndarray]:
    """MuSc LNAMD: one unit-norm feature set ``[N, h*w, D]`` per degree r (scored separately)."""
    normed = map_layer_norm(grid.astype(np.float32))
    n, h, w, d = grid.shape
    return [l2_normalise(box_mean(normed, r)).reshape(n, h * w, d) for r in degrees]


def snamd(grid: np.ndarray, degrees: tuple[int, ...] = DEFAULT_DEGREES, unit_tokens: bool = True) -> np.ndarray:
    """MuSc-V2 SNAMD: similarity-weighted r x r means, averaged over degrees, then L2-normalised.

    Weight of window element q around centre p is ``exp(-||f(q) - f(p)||)`` (zero-padded outside the grid,
    so border padding gets ``exp(-||f(p)||)``); each degree's mean is normalised by its weight sum.

    ``unit_tokens`` (default) L2-normalises the tokens first, as MuSc-V2 does for 3D tokens, so distances lie
    in [0, 2] and the weights in [e^-2, 1]. On raw post-LayerNorm ViT tokens (norms 45-90 for ViT-S/14) the
    weights underflow to ~0 and the pooling collapses to the identity (MuSc-V2 SWPooling); with unit
    tokens it really pools similar neighbours. Measured on MVTec AD bottle (blocks 6 and 9, batch): pixel AP
    87.0 vs 81.9 at 448 px, image AUROC 99.8 vs 98.7. ``unit_tokens=False`` is the official code's behaviour.
    """
    grid = grid.astype(np.float32, copy=False)
    if unit_tokens:
        grid = l2_normalise(grid)
    n, h, w, d = grid.shape
    r_max = max(degrees)
    half = r_max // 2
    padded = np.zeros((n, h + 2 * half, w + 2 * half, d), dtype=np.float32)
    padded[:, half:half + h, half:half + w] = grid
    numer = {r: np.zeros_like(grid) for r in degrees}
    denom = {r: np.zeros((n, h, w, 1), dtype=np.float32) for r in degrees}
    for dy in range(-half, half + 1):
        for dx in range(-half, half + 1):
            shifted = padded[:, half + dy:half + dy + h, half + dx:half + dx + w]
            weight = np.exp(-np.linalg.norm(shifted - grid, axis=-1, keepdims=True))
            weighted = weight * shifted
            for r in degrees:
                if max(abs(dy), abs(dx)) <= r // 2:
                    numer[r] += weighted
                    denom[r] += weight
    pooled = sum(numer[r] / denom[r] for r in degrees) / len(degrees)
    return l2_normalise(pooled).reshape(n, h * w, d)


def aggregate(layers: list[np.ndarray], method: str = "snamd",
              degrees: tuple[int, ...] = DEFAULT_DEGREES) -> list[np.ndarray]:
    """Feature sets to score, from per-layer token grids ``[N, h, w, D]``.

    ``snamd`` (unit-norm weights) and ``snamd-raw`` (the official raw-token weights) give one set per layer
    (V2); ``lnamd`` one set per (layer, degree) (V1). The patch score is
    the mean of the MSM scores over the returned sets, which reproduces both papers' fusion.
    """
    if method == "snamd":
        return [snamd(layer, degrees) for layer in layers]
    if method == "snamd-raw":
        return [snamd(layer, degrees, unit_tokens=False) for layer in layers]
    if method == "lnamd":
        return [fs for layer in layers for fs in lnamd(layer, degrees)]
    if method == "none":
        return [l2_normalise(layer.astype(np.float32)).reshape(layer.shape[0], -1, layer.shape[-1])
                for layer in layers]
    raise ValueError(f"unknown aggregation {method!r}: expected 'snamd', 'snamd-raw', 'lnamd' or 'none'")
