"""Mutual Scoring Mechanism (MSM), batch and one-vs-pool.

A patch's distance to a sample is its best match over *all* of that sample's patches; its score is the
mean of its lowest ``fraction`` of those distances over the reference samples (MuSc, ICLR 2024; ``_MSM.py``). Features
are unit vectors, so distances come from one matrix product: ``d = sqrt(2 - 2 cos)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_FRACTION = 0.3
# Above this many bytes for the [N, P, N] distance array, batch MSM scores queries in chunks instead
# (exact, twice the matrix products): a 1,000-image category at 224 px would need 1 GB per feature set.
BATCH_MEMORY_BYTES = 256 * 2**20


class PoolTooSmallError(ValueError):
    """Mutual scoring needs at least one reference sample in the interval average."""


def interval_k(n_refs: int, fraction: float = DEFAULT_FRACTION) -> int:
    """How many of the lowest distances are averaged: ``max(1, floor(fraction * n_refs))``.

    The same rule serves batch (n_refs = N - 1) and one-vs-pool (n_refs = pool size), so both protocols
    give identical numbers where they coincide; the floor of 1 avoids the official code's NaN for N < 5.
    """
    if n_refs < 1:
        raise PoolTooSmallError(f"mutual scoring needs at least 1 reference sample, got {n_refs}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"interval fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * n_refs))


def _cos_to_dist(max_cos: np.ndarray) -> np.ndarray:
    np.clip(max_cos, -1.0, 1.0, out=max_cos)
    return np.sqrt(np.maximum(2.0 - 2.0 * max_cos, 0.0), out=max_cos)


def interval_mean(dist: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k smallest entries along the last axis (partial partition, no full sort)."""
    if k >= dist.shape[-1]:
        return dist.mean(axis=-1)
    part = np.partition(dist, k - 1, axis=-1)[..., :k]
    return part.mean(axis=-1)


def patch_to_sample_distances(query: np.ndarray, refs: np.ndarray,
                              workspace: np.ndarray | None = None) -> np.ndarray:
    """``[P, K]``: distance of every query patch to its nearest patch in each reference sample.

    ``query`` is ``[P, D]``; ``refs`` is ``[K, Q, D]`` or a flat ``[K*Q, D]`` view with ``Q = P``.
    ``workspace`` (``[P, K*Q]`` float32) is reused for the similarity matrix when given.
    """
    p = query.shape[0]
    flat = refs.reshape(-1, refs.shape[-1])
    n_refs = refs.shape[0] if refs.ndim == 3 else flat.shape[0] // p
    if n_refs < 1:
        raise PoolTooSmallError("no reference samples to score against")
    if workspace is not None and workspace.shape == (p, flat.shape[0]):
        sim = np.matmul(query, flat.T, out=workspace)
    else:
        sim = query @ flat.T
    best = sim.reshape(p, n_refs, -1).max(axis=2)
    return _cos_to_dist(best)


@dataclass
class OneVsPool:
    """One sample's MSM against a pool, over all its feature sets."""

    patch: np.ndarray       # [P] patch scores, mean over the feature sets
    closeness: np.ndarray   # [K] mean patch distance to each reference (about 0 for the same part again)


def one_vs_pool(query_sets: list[np.ndarray], pool_sets: list[np.ndarray], fraction: float = DEFAULT_FRACTION,
                keep: np.ndarray | None = None, workspaces: list[np.ndarray] | None = None,
                look_ahead: Sequence[Sequence[np.ndarray]] = ()) -> OneVsPool:
    """One-vs-pool MSM: ``query_sets[s]`` is ``[P, D]``, ``pool_sets[s]`` is ``[K, P, D]`` (or flat).

    ``keep`` (``[K]`` bool) leaves references out (a part is never scored against itself); ``workspaces``
    (one ``[P, K*P]`` float32 per set) are reused for the similarity matrices; ``look_ahead`` are later parts'
    feature sets, references too (:func:`pool_msm`). MuSc (ICLR 2024), MSM.
    """
    dists = [patch_to_sample_distances(query, refs, workspaces[s] if workspaces else None)
             for s, (query, refs) in enumerate(zip(query_sets, pool_sets))]
    return pool_msm(dists, fraction, keep, look_ahead_distances(query_sets, look_ahead))


def look_ahead_distances(query_sets: Sequence[np.ndarray],
                         look_ahead: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray] | None:
    """Per feature set ``[P, L]``: distances of the query's patches to ``L`` later parts (each part a list of
    ``[P, D]`` sets, as the pool's members are), or None without look-ahead parts."""
    if not look_ahead:
        return None
    return [patch_to_sample_distances(query, np.stack([part[s] for part in look_ahead]))
            for s, query in enumerate(query_sets)]


def pool_msm(member_dists: Sequence[np.ndarray], fraction: float, keep: np.ndarray | None = None,
             look_ahead_dists: Sequence[np.ndarray] | None = None) -> OneVsPool:
    """MSM from per-set patch-to-sample distances ``[P, K]`` to the pool's members.

    ``look_ahead_dists`` (per set ``[P, L]``) are the distances to parts that arrived after the query and are
    not members yet: they count as references in the interval average (the line's look-ahead verdicts bring it
    closer to the batch protocol, where every image is a reference of every other), but not in ``closeness``,
    which measures the members (the near-duplicate rule of admission).
    """
    patch = np.zeros(member_dists[0].shape[0], dtype=np.float32)
    closeness = 0.0
    for s, dist in enumerate(member_dists):
        if keep is not None:
            dist = dist[:, keep]
        closeness = closeness + dist.mean(axis=0, dtype=np.float64)
        if look_ahead_dists is not None:
            dist = np.concatenate([dist, look_ahead_dists[s]], axis=1)
        patch += interval_mean(dist, interval_k(dist.shape[1], fraction))
    patch /= len(member_dists)
    return OneVsPool(patch, closeness / len(member_dists))


def batch_distances(features: np.ndarray, chunk: int = 8) -> np.ndarray:
    """``[N, P, N]`` patch-to-sample distances of every sample against every other (diagonal = inf).

    Each pair (i, j) is computed once: the row maxima of ``Z_i Z_j^T`` score i's patches against j, and
    the column maxima score j's patches against i.
    """
    n, p, d = features.shape
    if n < 2:
        raise PoolTooSmallError(f"batch scoring needs at least 2 samples, got {n}")
    best = np.full((n, p, n), -np.inf, dtype=np.float32)
    flat = features.reshape(n * p, d)
    for i in range(n - 1):
        for start in range(i + 1, n, chunk):
            stop = min(start + chunk, n)
            sim = (features[i] @ flat[start * p:stop * p].T).reshape(p, stop - start, p)
            best[i, :, start:stop] = sim.max(axis=2)
            best[start:stop, :, i] = sim.max(axis=0)
    dist = _cos_to_dist(best)
    idx = np.arange(n)
    dist[idx, :, idx] = np.inf
    return dist


def score_batch(features: np.ndarray, fraction: float = DEFAULT_FRACTION,
                memory_bytes: int = BATCH_MEMORY_BYTES) -> np.ndarray:
    """Batch MSM for one feature set ``[N, P, D]``: patch scores ``[N, P]``, each sample vs all others.

    Small batches compute each pair once (:func:`batch_distances`); when the ``[N, P, N]`` distances
    would exceed ``memory_bytes`` the queries are scored in chunks that fit (same numbers)."""
    n, p, _ = features.shape
    if n < 2:
        raise PoolTooSmallError(f"batch scoring needs at least 2 samples, got {n}")
    k = interval_k(n - 1, fraction)
    if n * p * n * 4 <= memory_bytes:
        # The inf self-distance sorts last, so the k smallest never include it.
        return interval_mean(batch_distances(features), k)
    return score_batch_chunked(features, k, max(1, memory_bytes // (3 * p * n * 4)))


def score_batch_chunked(features: np.ndarray, k: int, queries: int, refs: int = 8) -> np.ndarray:
    """Batch MSM in bounded memory: ``queries`` samples at a time against ``refs`` references at a time.

    Peak extra memory is about ``queries * P * N`` distances plus one ``[queries * P, refs * P]``
    similarity block, independent of how many chunks there are."""
    n, p, d = features.shape
    flat = features.reshape(n * p, d)
    scores = np.empty((n, p), np.float32)
    for start in range(0, n, queries):
        stop = min(start + queries, n)
        block = flat[start * p:stop * p]
        best = np.empty((stop - start, p, n), np.float32)
        for r0 in range(0, n, refs):
            r1 = min(r0 + refs, n)
            sim = (block @ flat[r0 * p:r1 * p].T).reshape(stop - start, p, r1 - r0, p)
            best[:, :, r0:r1] = sim.max(axis=3)
        dist = _cos_to_dist(best)
        own = np.arange(start, stop)
        dist[own - start, :, own] = np.inf
        scores[start:stop] = interval_mean(dist, k)
    return scores
