"""Per-point features of an organised scan pooled to a square patch grid (the 2D side's kind of token).

The FPFH baseline (3d-features.md): each foreground point's descriptor is put back at its pixel of the
``size x size`` grid (zeros elsewhere) and average-pooled over ``cell x cell`` windows, so a patch token is
the mean over the whole window, background counted as zeros: a patch half off the part reads differently
from one inside it, which keeps the silhouette (measured better than averaging the foreground pixels only).
Larger receptive fields ("layers") are box means of ``r x r`` neighbouring patches (LNAMD-like degrees).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter


def cell_size(size: int, grid: int) -> int:
    """Pixels per patch side; ``size`` must be a whole number of ``grid`` patches."""
    if grid < 1 or size % grid:
        raise ValueError(f"a {size}x{size} grid is not a whole number of {grid}x{grid} patches")
    return size // grid


def pool_to_grid(features: np.ndarray, pixel_ids: np.ndarray, size: int, grid: int) -> np.ndarray:
    """``[grid, grid, F]`` window means of per-point ``features [N, F]`` placed at raster ``pixel_ids``."""
    cell = cell_size(size, grid)
    flat = np.zeros((size * size, features.shape[1]), np.float32)
    flat[pixel_ids] = features
    return flat.reshape(grid, cell, grid, cell, -1).mean(axis=(1, 3))


def box_degrees(tokens: np.ndarray, degrees: tuple[int, ...]) -> list[np.ndarray]:
    """One ``[grid * grid, F]`` token set per degree r: the mean of each patch's ``r x r`` neighbourhood
    (zeros beyond the grid edge)."""
    if not degrees or any(r < 1 for r in degrees):
        raise ValueError(f"patch degrees must be positive integers, got {degrees}")
    f = tokens.shape[-1]
    return [(tokens if r == 1 else uniform_filter(tokens, size=(r, r, 1), mode="constant")).reshape(-1, f)
            for r in degrees]


def cell_centres(size: int, grid: int) -> np.ndarray:
    """``[grid * grid]`` raster pixel at (or just past) the centre of each patch."""
    cell = cell_size(size, grid)
    centre = np.arange(grid) * cell + cell // 2
    return (centre[:, None] * size + centre[None, :]).ravel()


def covered_pixels(pixel_ids: np.ndarray, size: int, grid: int) -> np.ndarray:
    """Raster ids of every pixel in a patch that holds at least one of ``pixel_ids`` (the map's support)."""
    cell = cell_size(size, grid)
    covered = np.zeros(grid * grid, bool)
    rows, cols = np.divmod(np.asarray(pixel_ids, np.int64), size)
    covered[(rows // cell) * grid + cols // cell] = True
    return np.flatnonzero(np.repeat(np.repeat(covered.reshape(grid, grid), cell, 0), cell, 1).ravel())


def bilinear_weights(pixel_ids: np.ndarray, size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """``([N, 4] patch index, [N, 4] weight)``: bilinear interpolation of patch-centre values at pixels."""
    cell = cell_size(size, grid)
    rows, cols = np.divmod(np.asarray(pixel_ids, np.int64), size)
    index, weight = [], []
    fy, fx = (rows + 0.5) / cell - 0.5, (cols + 0.5) / cell - 0.5
    y0, x0 = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    wy, wx = fy - y0, fx - x0
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = np.clip(y0 + dy, 0, grid - 1), np.clip(x0 + dx, 0, grid - 1)
        index.append(y * grid + x)
        weight.append((wy if dy else 1 - wy) * (wx if dx else 1 - wx))
    return np.stack(index, axis=1), np.stack(weight, axis=1).astype(np.float32)
