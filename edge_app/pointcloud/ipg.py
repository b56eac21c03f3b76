"""Point grouping for 3D patch features: farthest-point centres, curvature, plain kNN and IPG groups.

IPG (Iterative Point Grouping, MuSc-V2, ``_IPG.py``): a centre whose neighbourhood is flat
(surface variation < tau) gets its plain M-NN group; a curved / edge centre starts from its ``k_iter``
nearest points and grows by repeatedly adding the candidates (from its 2M-NN) closest to the current
members, so the group follows the surface instead of swallowing a nearby disconnected one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

DEFAULT_GROUPS = 1024
DEFAULT_GROUP_SIZE = 128
DEFAULT_K_ITER = 80
CURVATURE_THRESHOLD = 0.01
MIN_POINTS = 16


@dataclass(frozen=True)
class Grouping:
    """Groups of one cloud. Indices refer to the cloud's point array."""

    centre_index: np.ndarray  # [G] int64 point index of each centre
    centres: np.ndarray       # [G, 3] float32
    groups: np.ndarray        # [G, M] int64 member indices (kNN order; grown members after the seed)
    curvature: np.ndarray     # [G] float32 surface variation lambda_min / sum(lambda)


def farthest_point_sampling(points: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``[n]`` indices of farthest-point-sampled centres; the first one is drawn with ``seed``.

    Each step is one matrix-vector product (``|x - c|^2 = |x|^2 - 2 x.c + |c|^2``) into reused buffers.
    """
    count = points.shape[0]
    if not 1 <= n <= count:
        raise ValueError(f"cannot sample {n} centres from {count} points")
    pts = points.astype(np.float64, copy=False)
    sq_norm = np.einsum("ij,ij->i", pts, pts)
    nearest = np.full(count, np.inf)
    dist = np.empty(count)
    chosen = np.empty(n, dtype=np.int64)
    current = int(np.random.default_rng(seed).integers(count))
    for i in range(n):
        chosen[i] = current
        centre = pts[current]
        np.dot(pts, centre, out=dist)
        dist *= -2.0
        dist += sq_norm
        dist += sq_norm[current]
        np.minimum(nearest, dist, out=nearest)
        current = int(nearest.argmax())
    return chosen


def surface_variation(points: np.ndarray, centre_index: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """``[G]`` curvature ``lambda_min / (l1 + l2 + l3)`` of each centre's neighbourhood.

    ``neighbours [G, M]`` are the centre's M nearest points with the centre first; as in the official
    code the centre is left out and the covariance uses ``1 / (M - 2)``. (Scaling the offsets by the
    largest radius, as the official code does, leaves the ratio unchanged and is skipped.)
    """
    if neighbours.shape[1] < 4:
        raise ValueError(f"curvature needs at least 4 neighbours per centre, got {neighbours.shape[1]}")
    offsets = points[neighbours[:, 1:]].astype(np.float64) - points[centre_index, None].astype(np.float64)
    offsets -= offsets.mean(axis=1, keepdims=True)
    cov = np.matmul(offsets.transpose(0, 2, 1), offsets) / (neighbours.shape[1] - 2)
    eig = np.linalg.eigvalsh(cov)
    total = eig.sum(axis=1)
    return np.where(total > 0, eig[:, 0] / np.where(total > 0, total, 1.0), 0.0).astype(np.float32)


def knn_groups(points: np.ndarray, centre_index: np.ndarray, group_size: int,
               tree: cKDTree | None = None) -> np.ndarray:
    """``[G, M]`` plain Euclidean M-NN groups (Point-MAE / M3DM grouping), nearest first."""
    tree = cKDTree(points) if tree is None else tree
    return tree.query(points[centre_index], k=group_size)[1].astype(np.int64).reshape(len(centre_index), -1)


def grow_groups(points: np.ndarray, search: np.ndarray, group_size: int, k_iter: int = DEFAULT_K_ITER,
                chunk: int = 64) -> np.ndarray:
    """``[C, M]`` region-grown groups from each centre's search list ``search [C, k]`` (nearest first).

    Start with the ``k_iter`` nearest points; while the group is short, add the ``min(k_iter, M - size)``
    candidates of the search list closest to *any* current member. Unlike the official code, which takes
    the smallest entries of the flattened member x candidate matrix and may add a point twice, each
    candidate is ranked by its distance to the nearest member, so members are distinct.
    """
    n_centres, k = search.shape
    k_iter = min(k_iter, group_size)
    if k < group_size:
        raise ValueError(f"search lists of {k} points cannot fill groups of {group_size}")
    out = np.empty((n_centres, group_size), dtype=np.int64)
    out[:, :k_iter] = search[:, :k_iter]
    if k_iter == group_size:
        return out
    for start in range(0, n_centres, chunk):
        rows = slice(start, min(start + chunk, n_centres))
        xyz = points[search[rows]].astype(np.float32)                          # [c, k, 3]
        sq = np.einsum("cki,cki->ck", xyz, xyz)
        pair = sq[:, :, None] + sq[:, None, :] - 2.0 * np.matmul(xyz, xyz.transpose(0, 2, 1))
        to_group = pair[:, :k_iter].min(axis=1)                                # [c, k] distance to members
        member = np.zeros(to_group.shape, dtype=bool)
        member[:, :k_iter] = True
        local = np.arange(to_group.shape[0])[:, None]
        size = k_iter
        while size < group_size:
            step = min(k_iter, group_size - size)
            to_group[member] = np.inf
            picked = np.argpartition(to_group, step - 1, axis=1)[:, :step]     # [c, step] columns of search
            member[local, picked] = True
            out[rows, size:size + step] = search[rows][local, picked]
            np.minimum(to_group, pair[local, picked].min(axis=1), out=to_group)
            size += step
    return out


def group_points(points: np.ndarray, n_groups: int = DEFAULT_GROUPS, group_size: int = DEFAULT_GROUP_SIZE,
                 method: str = "ipg", k_iter: int = DEFAULT_K_ITER, tau: float = CURVATURE_THRESHOLD,
                 seed: int = 0, min_points: int = MIN_POINTS) -> Grouping:
    """Centres, groups and curvature of a foreground cloud ``[N, 3]``.

    ``method`` is ``ipg`` (MuSc-V2) or ``knn`` (plain). G and M are clamped to N for small clouds; fewer
    than ``min_points`` points is an error. ``k_iter`` is clamped to 5/8 of M (the official 80 of 128) so
    that smaller groups still grow instead of degenerating to kNN.
    """
    if method not in ("ipg", "knn"):
        raise ValueError(f"unknown grouping {method!r}: expected 'ipg' or 'knn'")
    count = points.shape[0]
    if count < min_points:
        raise ValueError(f"too few foreground points to group: {count} < {min_points}")
    n_groups, group_size = min(n_groups, count), min(group_size, count)
    if group_size < 4:
        raise ValueError(f"group size must be at least 4, got {group_size}")
    k_iter = max(1, min(k_iter, round(group_size * DEFAULT_K_ITER / DEFAULT_GROUP_SIZE)))
    centre_index = farthest_point_sampling(points, n_groups, seed)
    tree = cKDTree(points)
    search = knn_groups(points, centre_index, min(2 * group_size, count), tree)
    curvature = surface_variation(points, centre_index, search[:, :group_size])
    groups = search[:, :group_size].copy()
    if method == "ipg":
        curved = np.flatnonzero(curvature >= tau)
        if curved.size:
            groups[curved] = grow_groups(points, search[curved], group_size, k_iter)
    return Grouping(centre_index, points[centre_index].astype(np.float32), groups, curvature)


def relative_groups(points: np.ndarray, grouping: Grouping) -> np.ndarray:
    """``[G, M, 3]`` member coordinates relative to their centre (the point encoder's input)."""
    return points[grouping.groups] - grouping.centres[:, None, :]
