"""Pool of scanned parts (``3d`` / ``2d+3d`` recipes): 2D feature sets and 3D samples, one-vs-pool scoring.

The scan counterpart of :class:`musc_edge.edge.pool.FeaturePool`; both share :class:`musc_edge.edge.pool.PoolMembers`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .pool import PoolMembers, part_descriptor
from .score import PoolScore, PreparedScan
from .scoring import MuscParams, PoolTooSmallError, patch_to_sample_distances, rescore_one
from .scoring3d import FusionParams, Sample3D, score_batch, score_one
from .scoring3d.map3d import DEFAULT_SIGMA, Propagation

SCAN_MODES = ("3d", "2d+3d")
_NO_MEMBERS = np.zeros((0, 0), np.int32)


def scan_descriptor(sets: Sequence[np.ndarray], layer_3d: np.ndarray) -> np.ndarray:
    """A scanned part's global descriptor: the means of its first 2D set (if any) and first 3D layer, each a
    unit vector, concatenated."""
    parts = [part_descriptor(sets[0])] if len(sets) else []
    parts.append(part_descriptor(layer_3d))
    out = np.concatenate(parts)
    return out / np.linalg.norm(out)


def fusion_params(mode: str, params: MuscParams, sigma: float, image_distance: str = "euclidean") -> FusionParams:
    """MuSc-V2 scoring settings for ``mode`` with the 2D scoring's interval fraction, windows and salient layer."""
    return FusionParams(mode=mode, fraction=params.fraction, windows=params.windows,
                        salient_layer=params.salient_layer, sigma=sigma, image_distance=image_distance)



class ScanPool(PoolMembers):
    """Fixed-capacity FIFO pool of scanned parts of one recipe: 2D feature sets and 3D samples.

    Admission, capacity, ``min_size``, golden members and same-part exclusion work as in
    :class:`musc_edge.edge.pool.FeaturePool` (FIFO eviction only). 2D sets are kept in float16 (what is persisted)
    with a float32 working copy, so a restored pool scores identically; 3D layers stay float32. A member
    keeps what scoring reads of its 3D sample (layers, centres, centre pixels, curvature, map propagation);
    group member pixels are dropped. Near-duplicates are measured on the 2D sets only: hand-crafted 3D
    descriptors cannot tell a re-scan of one part from another part of the same type, so a ``3d`` pool
    relies on part ids alone.
    """

    def __init__(self, mode: str, capacity: int, n_sets: int, patches: int, dim: int, image_size: int, *,
                 min_size: int = 10, sigma: float = DEFAULT_SIGMA, eviction: str = "fifo", scale: str = "frozen",
                 image_distance: str = "euclidean"):
        if mode not in SCAN_MODES:
            raise ValueError(f"unknown scan pool mode {mode!r}: expected one of {SCAN_MODES}")
        self._init_members(capacity, min_size, scale)
        self.mode = mode
        if eviction not in ("fifo", "coverage"):
            raise ValueError(f"unknown scan pool eviction {eviction!r}: expected 'fifo' or 'coverage'")
        self.eviction = eviction
        self.image_size, self.sigma = image_size, sigma
        self.image_distance = image_distance
        self.n_sets = n_sets if mode == "2d+3d" else 0
        self.patches, self.dim = patches, dim
        self.sets16 = np.zeros((self.n_sets, capacity, patches, dim), np.float16)
        self.work = np.zeros((self.n_sets, capacity, patches, dim), np.float32)
        self.layers: np.ndarray | None = None     # [L, capacity, G, F], shaped by the first member
        self.features: np.ndarray | None = None   # [capacity, F] re-scoring features
        self.geometry: list[Sample3D | None] = [None] * capacity   # members' samples without layers

    def fusion(self, params: MuscParams) -> FusionParams:
        return fusion_params(self.mode, params, self.sigma, self.image_distance)

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(self, query: PreparedScan, grid: tuple[int, int] | None, params: MuscParams,
              exclude_part_id: str | None = None, look_ahead: Sequence[PreparedScan] = ()) -> PoolScore:
        """Score a prepared scan against the pool, excluding members with its own part id; ``look_ahead``
        (later parts, not members yet) are extra references of the MSM but not of the re-scoring."""
        n = self.size
        members: slice | np.ndarray = slice(0, n)
        n_refs = n
        if exclude_part_id is not None and exclude_part_id in self.part_ids[:n]:
            members = np.flatnonzero([pid != exclude_part_id for pid in self.part_ids[:n]])
            n_refs = len(members)
        if n_refs < 1 or n < self.min_size:
            raise PoolTooSmallError(f"pool has {n_refs} usable members; {self.min_size} needed to score")
        pool_2d = [self.work[s, members] for s in range(self.n_sets)] or None
        pool_3d = [layer[members] for layer in self.layers]
        if look_ahead:
            if pool_2d is not None:
                pool_2d = [np.concatenate([refs, np.stack([p.sets[s] for p in look_ahead])])
                           for s, refs in enumerate(pool_2d)]
            pool_3d = [np.concatenate([refs, np.stack([p.sample.layers[i] for p in look_ahead])])
                       for i, refs in enumerate(pool_3d)]
        result = score_one(query.sets or None, query.sample, pool_2d, pool_3d, grid, self.image_size,
                           self.fusion(params))
        pool_raw = self.raw_scores[members]
        score = rescore_one(result.raw, result.feature, pool_raw, self.features[members],
                            self.score_range(pool_raw, params), params.windows)
        return PoolScore(result.map, result.raw, score, result.feature, n_refs + len(look_ahead))

    def rescore_members(self, grid: tuple[int, int] | None, params: MuscParams) -> None:
        """Score the members among themselves (batch, leave-one-out), so each has a raw score and a
        re-scoring feature computed the same way (when a warm-up pool fills, or after seeding)."""
        n = self.size
        if n < 2:
            raise PoolTooSmallError(f"pool has {n} members; at least 2 are needed to score them")
        samples = [dataclasses.replace(self.geometry[i], layers=tuple(self.layers[:, i])) for i in range(n)]
        sets = [self.work[s, :n] for s in range(self.n_sets)] or None
        result = score_batch(sets, samples, grid, self.image_size, self.fusion(params))
        self.raw_scores[:n] = result.raw
        self.features[:n] = result.features
        self._members_scored(params)

    # -- membership ------------------------------------------------------------------------------------------
    def nearest_distance(self, query_sets: Sequence[np.ndarray]) -> float:
        """Mean nearest-patch 2D distance of a part to its closest member (inf without 2D or members),
        on the same scale as :meth:`musc_edge.edge.pool.FeaturePool.nearest_distance`."""
        if self.size == 0 or not query_sets:
            return float("inf")
        closeness = sum(patch_to_sample_distances(q, self.work[s, :self.size]).mean(axis=0)
                        for s, q in enumerate(query_sets))
        return float(np.min(closeness)) / len(query_sets)

    def _slot_to_fill(self) -> int | None:
        if self.size < self.capacity:
            return self.size
        return self._most_redundant() if self.eviction == "coverage" else self._oldest_unfrozen()

    def _shape_for(self, sample: Sample3D, feature_dim: int) -> None:
        """Allocate the 3D arrays from the first member; later members must have the same shapes."""
        shape = (len(sample.layers), *sample.layers[0].shape)
        if self.layers is None:
            self.layers = np.zeros((shape[0], self.capacity, *shape[1:]), np.float32)
            self.features = np.zeros((self.capacity, feature_dim), np.float32)
        have = (self.layers.shape[0], *self.layers.shape[2:])
        if shape != have or self.features.shape[1] != feature_dim:
            raise ValueError(f"scan with 3D layers {shape} and feature dim {feature_dim} does not fit a pool of "
                             f"{have} and {self.features.shape[1]}")

    def admit(self, part_id: str, query: PreparedScan, raw_score: float, feature: np.ndarray | None,
              now: float = 0.0, golden: bool = False) -> int | None:
        """Add a member; returns its slot, or None when every member is golden. A member admitted without a
        ``feature`` (warm-up) gets zeros until :meth:`rescore_members`."""
        sample = query.sample
        if feature is None:
            feature = np.zeros((query.sets[0].shape[1] if query.sets else 0) + sample.layers[0].shape[1],
                               np.float32)
        self._shape_for(sample, feature.shape[0])
        slot = self._slot_to_fill()
        self.admissions += 1
        if slot is None:
            return None
        for s, fs in enumerate(query.sets):
            self.sets16[s, slot] = fs
            self.work[s, slot] = self.sets16[s, slot]
        self.layers[:, slot] = np.stack(sample.layers)
        self._descriptor_slot(slot, lambda: scan_descriptor(query.sets, sample.layers[0]))
        self.geometry[slot] = _geometry(sample)
        self._record(slot, part_id, raw_score, feature, now, golden)
        return slot

    def remove(self, slots: np.ndarray) -> None:
        """Drop members (purge); the remaining members are compacted to the front."""
        keep = np.setdiff1d(np.arange(self.size), np.asarray(slots, int))
        n = len(keep)
        self.sets16[:, :n] = self.sets16[:, keep]
        self.work[:, :n] = self.work[:, keep]
        if self.layers is not None:
            self.layers[:, :n] = self.layers[:, keep]
        self.geometry = [self.geometry[i] for i in keep] + [None] * (self.capacity - n)
        self._compact_members(keep)

    # -- persistence (musc_edge.edge.runtime.pool_store) -------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist; the members' propagations are concatenated, with per-member point counts."""
        n = self.size
        geo = self.geometry[:n]
        state = {"sets16": self.sets16[:, :n], "raw_scores": self.raw_scores[:n],
                 "part_ids": np.array(self.part_ids[:n], dtype=object).astype(str),
                 "admitted_seq": self.admitted_seq[:n], "admitted_time": self.admitted_time[:n],
                 "golden": self.golden[:n], "admissions": np.array(self.admissions), "scale": self._scale_state(),
                 "image_distance": np.array(self.image_distance)}
        if n == 0:
            return state
        return {**state, "layers": self.layers[:, :n], "features": self.features[:n],
                "centres": np.stack([g.centres for g in geo]), "curvature": np.stack([g.curvature for g in geo]),
                "centre_pixels": np.stack([g.centre_pixels for g in geo]),
                "point_counts": np.array([len(g.propagation.pixel_ids) for g in geo]),
                "prop_index": np.concatenate([g.propagation.index for g in geo]),
                "prop_weight": np.concatenate([g.propagation.weight for g in geo]),
                "prop_pixels": np.concatenate([g.propagation.pixel_ids for g in geo])}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore from :meth:`state` (the last ``capacity`` members when more were stored)."""
        stored = len(state["raw_scores"])
        n = min(stored, self.capacity)
        sets16 = state["sets16"]
        if sets16.shape[0] != self.n_sets or (self.n_sets and sets16.shape[2:] != (self.patches, self.dim)):
            raise ValueError(f"stored pool has 2D feature shape {sets16.shape}, this pool expects "
                             f"({self.n_sets}, n, {self.patches}, {self.dim})")
        self.remove(np.arange(self.size))
        self.admissions = int(state["admissions"])
        if n == 0:
            self._load_scale(state)
            return
        first = stored - n
        self.sets16[:, :n] = sets16[:, first:]
        self.work[:, :n] = self.sets16[:, :n]
        layers = state["layers"]
        self.layers = np.zeros((layers.shape[0], self.capacity, *layers.shape[2:]), np.float32)
        self.layers[:, :n] = layers[:, first:]
        self.features = np.zeros((self.capacity, state["features"].shape[1]), np.float32)
        self.features[:n] = state["features"][first:]
        for name in ("raw_scores", "admitted_seq", "admitted_time", "golden"):
            getattr(self, name)[:n] = state[name][first:]
        self.part_ids = [str(p) for p in state["part_ids"][first:]] + [None] * (self.capacity - n)
        bounds = np.concatenate(([0], np.cumsum(state["point_counts"])))
        for slot, i in enumerate(range(first, stored)):
            points = slice(bounds[i], bounds[i + 1])
            prop = Propagation(state["prop_index"][points], state["prop_weight"][points],
                               state["prop_pixels"][points], self.image_size)
            self.geometry[slot] = Sample3D(state["centres"][i], state["centre_pixels"][i], _NO_MEMBERS,
                                           state["curvature"][i], (), prop)
            self._descriptor_slot(slot, lambda: scan_descriptor([self.work[s, slot] for s in range(self.n_sets)],
                                                                self.layers[0, slot]))
        self.size = n
        self._load_scale(state)


def _geometry(sample: Sample3D) -> Sample3D:
    """What a pool keeps of a sample besides its layers (stored apart): no layers, no group member pixels,
    32-bit indices."""
    prop = sample.propagation
    return dataclasses.replace(sample, layers=(), group_pixels=_NO_MEMBERS,
                               centre_pixels=sample.centre_pixels.astype(np.int32),
                               propagation=Propagation(prop.index.astype(np.int32), prop.weight,
                                                       prop.pixel_ids.astype(np.int32), prop.size))
