"""SNAMD-3D: similarity-weighted pooling over neighbouring group centres, gated by curvature (MuSc-V2, ``_SNAMD.py``).

Per layer: L2-normalise the tokens; the neighbourhood of degree r is the r nearest centres (the centre
itself first); weights ``exp(-||f(h) - f(g)||)``; weighted means ``z^r`` for r in {1, 3, 5}. A flat group
(curvature < tau) gets ``[z^1; z^3; z^5]`` adaptive-average-pooled back to F dims (averages of
consecutive entries, so each third of the output summarises one degree); a curved group keeps its own
unit token, so nothing is smoothed across a possible discontinuity. There is no re-normalisation
afterwards: the official code's quirk (../shared/docs/algorithm.md §6), kept so the feature spaces match the
reported numbers.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..pointcloud.ipg import CURVATURE_THRESHOLD
from ..scoring.aggregate import DEFAULT_DEGREES, l2_normalise


def nearest_centres(centres: np.ndarray, r: int) -> np.ndarray:
    """``[G, r]`` indices of each centre's r nearest centres by distance, the centre itself first."""
    g = centres.shape[0]
    r = min(r, g)
    c = centres.astype(np.float64)
    sq = np.einsum("ij,ij->i", c, c)
    dist = sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)
    np.fill_diagonal(dist, -np.inf)   # self first even when two centres coincide
    part = np.argpartition(dist, r - 1, axis=1)[:, :r] if r < g else np.broadcast_to(np.arange(g), (g, g)).copy()
    order = np.argsort(np.take_along_axis(dist, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


@lru_cache(maxsize=16)
def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_in, n_out]`` matrix of 1-D adaptive average pooling (torch's bin edges)."""
    m = np.zeros((n_in, n_out), dtype=np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[lo:hi, i] = 1.0 / (hi - lo)
    m.setflags(write=False)
    return m


def snamd3d(tokens: np.ndarray, centres: np.ndarray, curvature: np.ndarray,
            degrees: tuple[int, ...] = DEFAULT_DEGREES, tau: float = CURVATURE_THRESHOLD,
            neighbours: np.ndarray | None = None) -> np.ndarray:
    """``[G, F]`` SNAMD-3D features of one layer's tokens ``[G, F]`` (centres ``[G, 3]``, curvature ``[G]``).

    ``neighbours`` (from :func:`nearest_centres` with ``r = max(degrees)``) can be shared across layers.
    """
    g, f = tokens.shape
    if centres.shape != (g, 3) or curvature.shape != (g,):
        raise ValueError(f"{g} tokens need centres [{g}, 3] and curvature [{g}], got {centres.shape} and "
                         f"{curvature.shape}")
    unit = l2_normalise(tokens.astype(np.float32))
    if neighbours is None:
        neighbours = nearest_centres(centres, max(degrees))
    if neighbours.shape[1] < min(max(degrees), g):
        raise ValueError(f"neighbour lists of {neighbours.shape[1]} cannot serve degree {max(degrees)}")
    nb = unit[neighbours]                                                   # [G, r_max, F]
    weight = np.exp(-np.linalg.norm(nb - unit[:, None, :], axis=-1))        # [G, r_max]
    weighted = weight[..., None] * nb
    pooled = [weighted[:, :r].sum(axis=1) / weight[:, :r].sum(axis=1, keepdims=True) for r in degrees]
    flat_feature = np.concatenate(pooled, axis=1) @ adaptive_pool_matrix(len(degrees) * f, f)
    return np.where((curvature < tau)[:, None], flat_feature, unit).astype(np.float32)
