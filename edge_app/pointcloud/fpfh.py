"""Per-point FPFH (Rusu et al. 2009), as open3d / PCL compute it, in numpy and scipy.

The training-free 3D baseline on MVTec 3D-AD (3d-features.md, "Back to the Feature"): normals from the PCA of
each point's k nearest neighbours (oriented towards the sensor), then for every point the SPFH, three 11-bin
histograms of the Darboux-frame angles (theta, alpha, phi) between its normal and each neighbour's, and the
FPFH, its SPFH plus the inverse-squared-distance weighted mean of its neighbours' SPFH (each histogram scaled
to sum 100, as open3d does). 33 values per point, rotation invariant. Neighbourhoods are k-NN (what binds in
the published recipe, where the radii are large against the part), so the result does not depend on units.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_array
from scipy.spatial import cKDTree

FPFH_BINS = 11
FPFH_DIM = 3 * FPFH_BINS
NORMAL_NEIGHBOURS = 30
FPFH_NEIGHBOURS = 100


def knn(points: np.ndarray, k: int, tree: cKDTree | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``([N, k] squared distances, [N, k] indices)`` of each point's k nearest points, itself first."""
    tree = cKDTree(points) if tree is None else tree
    dist, index = tree.query(points, k=k, workers=-1)
    return (dist.reshape(len(points), k) ** 2), index.reshape(len(points), k)


def pca_normals(points: np.ndarray, neighbours: np.ndarray, sensor: np.ndarray | None = None) -> np.ndarray:
    """``[N, 3]`` unit normals: smallest principal axis of each point's ``neighbours [N, k]``, turned to face
    ``sensor`` (default the origin, where an organised scan's camera sits)."""
    nb = points[neighbours].astype(np.float64)
    nb -= nb.mean(axis=1, keepdims=True)
    normals = np.linalg.eigh(np.matmul(nb.transpose(0, 2, 1), nb))[1][:, :, 0]
    towards = (np.zeros(3) if sensor is None else np.asarray(sensor, np.float64)) - points
    flip = np.einsum("ij,ij->i", normals, towards) < 0
    normals[flip] *= -1.0
    return normals


def _bins(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.floor(FPFH_BINS * (values - lo) / (hi - lo)), 0, FPFH_BINS - 1).astype(np.int64)


def _dot(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]


def spfh(points: np.ndarray, normals: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """``[N, 33]`` simplified point feature histograms over ``neighbours [N, k]`` (self first, skipped);
    each 11-bin histogram sums to 100. Vector components are kept as separate ``[N, k-1]`` arrays."""
    n, k = neighbours.shape
    pts, nrm = points.astype(np.float32, copy=False), normals.astype(np.float32, copy=False)
    dst = neighbours[:, 1:]
    dp = tuple(pts[dst, i] - pts[:, i, None] for i in range(3))
    length = np.sqrt(_dot(dp, dp))
    inv = 1.0 / np.maximum(length, 1e-30)
    dp = tuple(c * inv for c in dp)
    n1 = tuple(np.broadcast_to(nrm[:, i, None], dst.shape) for i in range(3))
    n2 = tuple(nrm[dst, i] for i in range(3))
    angle1, angle2 = _dot(n1, dp), _dot(n2, dp)
    # The Darboux frame sits on the point whose normal makes the smaller angle with the joining line.
    swap = np.abs(angle1) < np.abs(angle2)
    u = tuple(np.where(swap, b, a) for a, b in zip(n1, n2))
    other = tuple(np.where(swap, a, b) for a, b in zip(n1, n2))
    phi = np.where(swap, -angle2, angle1)
    sign = np.where(swap, np.float32(-1), np.float32(1))
    v = _cross(tuple(c * sign for c in dp), u)
    v_norm = np.sqrt(_dot(v, v))
    degenerate = (v_norm == 0) | (length == 0)
    inv = 1.0 / np.maximum(v_norm, 1e-30)
    v = tuple(c * inv for c in v)
    alpha = _dot(v, other)
    theta = np.arctan2(_dot(_cross(u, v), other), _dot(u, other))
    rows = np.repeat(np.arange(n) * FPFH_DIM, k - 1)
    keep = ~degenerate.ravel()
    hist = np.zeros(n * FPFH_DIM)
    for block, (values, lo, hi) in enumerate(((theta, -np.pi, np.pi), (alpha, -1.0, 1.0), (phi, -1.0, 1.0))):
        cols = block * FPFH_BINS + _bins(values.ravel(), lo, hi)
        hist += np.bincount(rows[keep] + cols[keep], minlength=n * FPFH_DIM)
    # open3d counts a degenerate pair (coincident points, or a neighbour along the normal) in bin 0 of every
    # histogram (its features are all zero); do the same so the histograms sum to 100.
    zeros = np.bincount(np.repeat(np.arange(n), k - 1)[~keep], minlength=n).astype(np.float64)
    for block, (lo, hi) in enumerate(((-np.pi, np.pi), (-1.0, 1.0), (-1.0, 1.0))):
        hist[np.arange(n) * FPFH_DIM + block * FPFH_BINS + _bins(np.zeros(1), lo, hi)[0]] += zeros
    return hist.reshape(n, FPFH_DIM) * (100.0 / (k - 1))


def fpfh(points: np.ndarray, normal_neighbours: int = NORMAL_NEIGHBOURS, fpfh_neighbours: int = FPFH_NEIGHBOURS,
         sensor: np.ndarray | None = None) -> np.ndarray:
    """``[N, 33]`` float32 FPFH of every point of ``points [N, 3]``; normals face ``sensor`` (default origin)."""
    count = points.shape[0]
    if count < 4:
        raise ValueError(f"FPFH needs at least 4 points, got {count}")
    k = min(fpfh_neighbours, count)
    tree = cKDTree(points)
    dist2, index = knn(points, max(k, min(normal_neighbours, count)), tree)
    normals = pca_normals(points, index[:, :min(normal_neighbours, count)], sensor)
    dist2, index = dist2[:, :k], index[:, :k]
    own = spfh(points, normals, index)
    # Neighbours' SPFH weighted by 1 / d^2 (coincident points skipped), each histogram rescaled to sum 100.
    weight = np.where(dist2[:, 1:] > 0, 1.0 / np.maximum(dist2[:, 1:], 1e-300), 0.0)
    rows = np.repeat(np.arange(count), k - 1)
    mixed = csr_array((weight.ravel(), (rows, index[:, 1:].ravel())), shape=(count, count)) @ own
    sums = mixed.reshape(count, 3, FPFH_BINS).sum(axis=2, keepdims=True)
    mixed = (mixed.reshape(count, 3, FPFH_BINS) * np.where(sums > 0, 100.0 / np.where(sums > 0, sums, 1), 0))
    return (mixed.reshape(count, FPFH_DIM) + own).astype(np.float32)
