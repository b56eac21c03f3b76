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
NORMAL_NEIGHBOURS = 15
FPFH_NEIGHBOURS = 100
FPFH_MASS = 600.0   # what a point's FPFH sums to: three histograms of 100 (its SPFH) plus 100 (its neighbours')


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


# (lo, hi - lo) of the theta, alpha and phi histograms, in the float32 the pair features are computed in
_RANGES = ((np.float32(-np.pi), np.float32(2 * np.pi)), (np.float32(-1.0), np.float32(2.0)),
           (np.float32(-1.0), np.float32(2.0)))
SPFH_CHUNK = 256   # points per block: a block's pair arrays (256 x k float32) stay in the CPU's L2 cache


def spfh(points: np.ndarray, normals: np.ndarray, neighbours: np.ndarray, chunk: int = SPFH_CHUNK) -> np.ndarray:
    """``[N, 33]`` simplified point feature histograms over ``neighbours [N, k]`` (self first, skipped);
    each 11-bin histogram sums to 100.

    PCL's pair features, in closed form: with ``d`` the unit vector from a point to its neighbour, normals
    ``n1`` (point) and ``n2`` (neighbour), ``a1 = n1.d``, ``a2 = n2.d``, ``c = n1.n2`` and
    ``det = d.(n1 x n2)``, the Darboux frame sits on the end whose normal is closer to ``d`` (``u`` with
    ``a = u.d``), and ``phi = a`` (``-a2`` when the frame is on the neighbour), ``alpha = det / r``,
    ``theta = atan2(t, c r)`` with ``r = sqrt(1 - a^2)`` and ``t = a2 - a1 c`` (``a2 c - a1``). Six scalars per
    pair instead of the frame's vectors: the same histograms as building ``u, v, w`` (tested), in fewer passes.
    Computed ``chunk`` points at a time (element-wise, so the result does not depend on ``chunk``).
    """
    n, k = neighbours.shape
    pts, nrm = points.astype(np.float32, copy=False), normals.astype(np.float32, copy=False)
    coords = [np.ascontiguousarray(pts[:, i]) for i in range(3)]    # 1-D gathers are the cheap ones
    axes = [np.ascontiguousarray(nrm[:, i]) for i in range(3)]
    hist = np.empty((n, FPFH_DIM), np.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        hist[start:stop] = _spfh_counts(coords, axes, neighbours[start:stop, 1:], slice(start, stop))
    return hist * (100.0 / (k - 1))


def _spfh_counts(coords: list[np.ndarray], axes: list[np.ndarray], dst: np.ndarray, rows: slice) -> np.ndarray:
    """``[m, 33]`` integer SPFH counts of the points ``rows`` with neighbours ``dst [m, k - 1]``."""
    d = [np.take(coords[i], dst) - coords[i][rows, None] for i in range(3)]
    length = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    inv = 1.0 / np.maximum(length, np.float32(1e-30))
    n1 = [axes[i][rows, None] for i in range(3)]
    n2 = [np.take(axes[i], dst) for i in range(3)]
    a1 = (n1[0] * d[0] + n1[1] * d[1] + n1[2] * d[2]) * inv
    a2 = (n2[0] * d[0] + n2[1] * d[1] + n2[2] * d[2]) * inv
    c = n1[0] * n2[0] + n1[1] * n2[1] + n1[2] * n2[2]
    det = (d[0] * (n1[1] * n2[2] - n1[2] * n2[1]) + d[1] * (n1[2] * n2[0] - n1[0] * n2[2])
           + d[2] * (n1[0] * n2[1] - n1[1] * n2[0])) * inv
    swap = np.abs(a1) < np.abs(a2)   # the frame moves to the neighbour
    a = np.where(swap, a2, a1)
    phi = np.where(swap, -a2, a1)
    r = np.sqrt(np.maximum(1.0 - a * a, 0.0))
    alpha = det / np.maximum(r, np.float32(1e-30))
    theta = np.arctan2(np.where(swap, a2 * c - a1, a2 - a1 * c), c * r)
    # open3d counts a degenerate pair (coincident points, or a neighbour along the normal) with all three
    # features zero; do the same, so the histograms sum to 100.
    degenerate = (r <= 1e-7) | (length == 0)
    m = dst.shape[0]
    keys = np.empty((3, *dst.shape), np.int64)   # flat histogram bin of every pair feature
    keys[:] = (np.arange(m) * FPFH_DIM)[:, None]
    for block, (values, (lo, span)) in enumerate(zip((theta, alpha, phi), _RANGES)):
        np.copyto(values, 0.0, where=degenerate)
        bins = np.floor(FPFH_BINS * (values - lo) / span)
        np.clip(bins, 0, FPFH_BINS - 1, out=bins)
        keys[block] += bins.astype(np.int64)
        keys[block] += block * FPFH_BINS
    return np.bincount(keys.ravel(), minlength=m * FPFH_DIM).reshape(m, FPFH_DIM)


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
    rows = np.arange(0, count * (k - 1) + 1, k - 1)   # CSR row pointers: k - 1 neighbours per row
    mixed = csr_array((weight.ravel(), index[:, 1:].ravel(), rows), shape=(count, count)) @ own
    sums = mixed.reshape(count, 3, FPFH_BINS).sum(axis=2, keepdims=True)
    mixed = (mixed.reshape(count, 3, FPFH_BINS) * np.where(sums > 0, 100.0 / np.where(sums > 0, sums, 1), 0))
    return (mixed.reshape(count, FPFH_DIM) + own).astype(np.float32)


def root_histograms(tokens: np.ndarray, mass: float = FPFH_MASS) -> np.ndarray:
    """``sqrt(mass * tokens)``: histogram tokens under the Hellinger map (as RootSIFT does for SIFT).

    Euclidean distances between rooted histograms of that mass are Hellinger distances (times ``sqrt(2) *
    mass``), which weigh a bin's relative change rather than its absolute one, so the small bins count as
    much as the few large ones. Scaled by the nominal ``mass`` so that the values keep the histograms' units
    (a bin holding the whole mass is unchanged) and the 3D distances stay far above the 2D ones in the fused
    image score, as without the map. Empty patches (zero tokens) stay zero.
    """
    return np.sqrt(np.maximum(tokens, 0.0) * np.float32(mass), dtype=np.float32)
