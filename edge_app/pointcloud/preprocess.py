"""Organised-cloud preprocessing for MuSc-V2 3D scoring (as MuSc-V2's code prepares MVTec 3D-AD).

Order, as in the official MVTec 3D-AD preprocessing: fit the background plane by RANSAC on the image-border
strip and drop points near it; keep the largest spatially connected cluster; nearest-neighbour resize of
the organised map to the model grid (or its warp to the part's canonical view, :mod:`.pose`); centre on the
foreground centroid and scale by the max radius.
Distances are in the sensor's units; the defaults are MVTec 3D-AD's (metres). Pure numpy / scipy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .io import CloudError, valid_mask
from .pose import canonical_affine, warp_cloud

# Half of the 26-neighbourhood: every unordered pair of touching voxels is visited once.
_HALF_NEIGHBOURHOOD = np.array([(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)
                                if (dx, dy, dz) > (0, 0, 0)], dtype=np.int64)


@dataclass(frozen=True)
class PreprocessParams:
    """Preprocessing settings (defaults: MuSc-V2's MVTec 3D-AD values, in metres)."""

    border: int = 10                 # width in pixels of the border strip the plane is fitted on
    plane_threshold: float = 0.004   # RANSAC inlier distance
    plane_removal: float = 0.005     # points closer than this to the plane are background
    ransac_iterations: int = 1000
    ransac_sample: int = 1024        # border points used to score hypotheses (all inliers refine the fit)
    cluster_eps: float = 0.006       # points closer than this are always in the same cluster
    remove_plane: bool = True
    keep_largest_cluster: bool = True
    seed: int = 0


@dataclass(frozen=True)
class PreparedCloud:
    """Foreground points on the model grid, normalised, with their pixel indices."""

    points: np.ndarray      # [N, 3] float32, centred on the foreground centroid, max radius 1
    pixel_ids: np.ndarray   # [N] int64 raster index into the size x size grid
    size: int               # model grid side (the paired RGB is resized to size x size as well)
    centroid: np.ndarray    # [3] foreground centroid in sensor units
    scale: float            # max radius in sensor units
    foreground: np.ndarray  # [H, W] bool kept pixels at the input resolution (see zero_background)
    affine: np.ndarray | None = None   # [2, 3] input pixel -> grid (canonical view); None: a plain resize


def border_strip(shape: tuple[int, int], width: int) -> np.ndarray:
    """``[H, W]`` bool mask of the ``width``-pixel frame around the image."""
    strip = np.ones(shape, dtype=bool)
    strip[width:shape[0] - width, width:shape[1] - width] = False
    return strip


def fit_plane_ransac(points: np.ndarray, threshold: float, iterations: int = 1000,
                     sample: int = 1024, seed: int = 0) -> tuple[np.ndarray, float]:
    """Plane ``n . x + d = 0`` (unit n) with the most inliers within ``threshold``.

    Minimal 3-point hypotheses are scored all at once (one matrix product per chunk) on at most ``sample``
    seeded points; the winner is refined by least squares on all its inliers.
    """
    if points.shape[0] < 3:
        raise ValueError(f"a plane needs at least 3 points, got {points.shape[0]}")
    rng = np.random.default_rng(seed)
    pts = points.astype(np.float64, copy=False)
    scored = pts if pts.shape[0] <= sample else pts[rng.choice(pts.shape[0], sample, replace=False)]
    triples = scored[rng.integers(0, scored.shape[0], size=(iterations, 3))]
    normals = np.cross(triples[:, 1] - triples[:, 0], triples[:, 2] - triples[:, 0])
    lengths = np.linalg.norm(normals, axis=1)
    usable = lengths > 1e-12
    if not usable.any():
        raise ValueError("all RANSAC samples are degenerate (points are collinear or identical)")
    normals = normals[usable] / lengths[usable, None]
    offsets = -np.einsum("ij,ij->i", normals, triples[usable, 0])
    counts = np.empty(normals.shape[0], dtype=np.int64)
    along = np.ascontiguousarray(scored.T)
    chunk = max(1, 2**17 // scored.shape[0])   # hypotheses per block: its distances (1 MiB) stay in cache
    for start in range(0, normals.shape[0], chunk):
        dist = normals[start:start + chunk] @ along
        dist += offsets[start:start + chunk, None]
        np.abs(dist, out=dist)
        counts[start:start + chunk] = np.count_nonzero(dist < threshold, axis=1)
    best = int(counts.argmax())
    inliers = pts[np.abs(pts @ normals[best] + offsets[best]) < threshold]
    centre = inliers.mean(axis=0)
    normal = np.linalg.svd(inliers - centre, full_matrices=False)[2][-1]
    return normal, float(-normal @ centre)


def largest_cluster(points: np.ndarray, eps: float) -> np.ndarray:
    """``[N]`` bool mask of the largest connected cluster.

    Points are binned into voxels of side ``eps``; touching voxels (26-neighbourhood) are joined, so any
    two points closer than ``eps`` end up in the same cluster (a DBSCAN-like eps-connectivity without
    core/noise distinction), in O(N log N).
    """
    if points.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    cells = np.floor((points - points.min(axis=0)) / eps).astype(np.int64) + 1
    dims = cells.max(axis=0) + 2
    keys = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
    voxels, voxel_of_point = np.unique(keys, return_inverse=True)
    voxel_cells = np.stack(np.unravel_index(voxels, tuple(dims)), axis=1)
    rows, cols = [], []
    for offset in _HALF_NEIGHBOURHOOD:
        c = voxel_cells + offset
        neighbour = (c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]
        pos = np.minimum(np.searchsorted(voxels, neighbour), voxels.shape[0] - 1)
        hit = voxels[pos] == neighbour
        rows.append(np.flatnonzero(hit))
        cols.append(pos[hit])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(rows.shape[0], dtype=np.int8), (rows, cols)), shape=(voxels.shape[0],) * 2)
    _, label_of_voxel = connected_components(graph, directed=False)
    label_of_point = label_of_voxel[voxel_of_point]
    return label_of_point == np.bincount(label_of_point).argmax()


def foreground_mask(cloud: np.ndarray, params: PreprocessParams = PreprocessParams(),
                    source: str = "<cloud>") -> np.ndarray:
    """``[H, W]`` bool: valid points that are off the background plane and in the largest cluster."""
    keep = valid_mask(cloud)
    if not keep.any():
        raise CloudError(f"{source}: cloud has no valid point (all missing)")
    if params.remove_plane:
        strip = border_strip(keep.shape, params.border) & keep
        if strip.sum() >= 3:  # no border points (part fills the view): nothing to fit, nothing removed
            try:
                normal, offset = fit_plane_ransac(cloud[strip], params.plane_threshold, params.ransac_iterations,
                                                  params.ransac_sample, params.seed)
            except ValueError as exc:
                raise CloudError(f"{source}: cannot fit the background plane on the border: {exc}") from exc
            dist = np.abs(np.nan_to_num(cloud.astype(np.float64) @ normal + offset, nan=np.inf))
            keep &= dist >= params.plane_removal
    if params.keep_largest_cluster and keep.any():
        rows, cols = np.nonzero(keep)
        in_cluster = largest_cluster(cloud[rows, cols].astype(np.float64), params.cluster_eps)
        keep[rows[~in_cluster], cols[~in_cluster]] = False
    if not keep.any():
        raise CloudError(f"{source}: no foreground point left after background-plane and cluster removal")
    return keep


def resize_nearest(grid: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an organised ``[H, W, ...]`` map to ``[size, size, ...]``.

    Source index ``floor(i * H / size)``, as torch's ``interpolate(mode='nearest')``; NaN stays NaN.
    """
    h, w = grid.shape[:2]
    rows = np.arange(size) * h // size
    cols = np.arange(size) * w // size
    return grid[rows[:, None], cols[None, :]]


def normalise_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre on the centroid and divide by the max radius; returns (points, centroid, scale)."""
    pts = points.astype(np.float64, copy=False)
    centroid = pts.mean(axis=0)
    centred = pts - centroid
    scale = float(np.sqrt((centred ** 2).sum(axis=1).max()))
    if scale == 0.0:
        raise ValueError("all foreground points coincide; the cloud has no extent")
    return (centred / scale).astype(np.float32), centroid, scale


def prepare_cloud(cloud: np.ndarray, size: int = 224, params: PreprocessParams = PreprocessParams(),
                  source: str = "<cloud>", pose_margin: float | None = None) -> PreparedCloud:
    """Foreground points of an organised ``[H, W, 3]`` cloud (NaN = missing) on a ``size x size`` grid.

    ``pose_margin`` None: the grid is the whole frame, resized. A number: the grid is the part's canonical
    view (:mod:`.pose`), the part's extent times ``pose_margin`` filling it.
    """
    if cloud.ndim != 3 or cloud.shape[2] != 3:
        raise CloudError(f"{source}: expected an organised cloud [H, W, 3], got shape {cloud.shape}")
    keep = foreground_mask(cloud, params, source)
    masked = np.where(keep[..., None], cloud, np.float32(np.nan)).astype(np.float32, copy=False)
    affine = None
    if pose_margin is None:
        resized = resize_nearest(masked, size)
    else:
        try:
            affine = canonical_affine(keep, size, pose_margin)
        except ValueError as exc:
            raise CloudError(f"{source}: {exc}") from exc
        resized = warp_cloud(masked, affine, size)
    on_grid = valid_mask(resized)
    if not on_grid.any():
        raise CloudError(f"{source}: the foreground vanishes when resized to {size}x{size}")
    points, centroid, scale = normalise_points(resized[on_grid])
    return PreparedCloud(points, np.flatnonzero(on_grid), size, centroid, scale, keep, affine)


def zero_background(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Copy of ``image [H, W, C]`` with pixels outside ``foreground [H, W]`` set to 0 (MuSc-V2 zeroes the
    background of the RGB as well as of the cloud)."""
    if image.shape[:2] != foreground.shape:
        raise ValueError(f"image {image.shape[:2]} and foreground mask {foreground.shape} are not aligned")
    return np.where(foreground[..., None], image, np.zeros((), dtype=image.dtype))
