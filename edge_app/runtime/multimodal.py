"""3D and 2D+3D (MuSc-V2) recipes on the line: per-part scan preparation, a pool of scans, inspection, admission.

A ``3d`` / ``2d+3d`` recipe scores each part's organised cloud (and, fused, its image) one-vs-pool with
:func:`edge_app.scoring3d.score_one`. The cloud is scored on the ``model.size`` grid of the image, so the
two stay pixel-aligned for CAE and the summed map. Every problem with the cloud (missing, not ``[H, W, 3]``,
no valid point, a size other than the image's, absurd coordinates, nothing left after background removal)
decides the part NO_VERDICT / SCANNER_ERROR with the reason in ``detail``; it never raises.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import RecipeSettings, ScanSettings
from ..evaluation.datasets import read_image
from ..pointcloud import CloudError, PreprocessParams, foreground_mask, read_cloud, to_organised, zero_background
from ..pool import PoolMembers, pool_range
from ..record import PartRecord, Reason, Verdict
from ..scoring import MuscParams, PoolTooSmallError, patch_to_sample_distances, rescore_one
from ..scoring3d import FusionParams, Params3D, Sample3D, patch_degrees, prepare_3d, score_batch, score_one
from ..scoring3d.map3d import DEFAULT_SIGMA, Propagation
from ..sources.scanner import cloud_problem
from .verdict import verdict_from_pool

log = logging.getLogger(__name__)

SCAN_MODES = ("3d", "2d+3d")
REFERENCE_SIZE = 224   # grid side the MuSc-V2 3D defaults (blur sigma) are given for
_NO_MEMBERS = np.zeros((0, 0), np.int32)


@dataclass
class PreparedScan:
    """A scanned part's scoring inputs."""

    sets: list[np.ndarray]             # 2D feature sets [P, D] (empty for a 3d recipe)
    sample: Sample3D
    feature: np.ndarray | None = None  # re-scoring feature, once scored


@dataclass
class ScanScore:
    """One scanned part scored against the pool."""

    map: np.ndarray      # [size, size] final (fused) anomaly map
    raw: float           # max of the map
    score: float         # after streaming RsCon (the value compared with the threshold)
    feature: np.ndarray  # [F] re-scoring feature
    n_refs: int


def descriptor_scales(scan: ScanSettings, modality: str, n_2d_sets: int) -> tuple[float, ...]:
    """The 3D layers' descriptor scales: explicit, or halving down from 1.0, one per 2D set (2d+3d) or three."""
    count = n_2d_sets if modality == "2d+3d" else 3
    scales = scan.scales or tuple(2.0 ** -(count - 1 - i) for i in range(count))
    if modality == "2d+3d" and len(scales) != n_2d_sets:
        raise ValueError(f"scan.scales gives {len(scales)} 3D layers but the 2D side has {n_2d_sets} feature "
                         "sets (model.blocks); 2d+3d pairs them layer by layer")
    return tuple(scales)


def scan_params(scan: ScanSettings, modality: str, size: int, n_2d_sets: int) -> Params3D:
    """How a recipe's clouds become :class:`Sample3D` on a ``size x size`` grid."""
    pre = scan.preprocess
    scales = descriptor_scales(scan, modality, n_2d_sets)
    return Params3D(size=size, n_groups=scan.n_groups, group_size=scan.group_size, grouping=scan.grouping,
                    tokens=scan.tokens, patch_pixels=scan.patch_pixels,
                    patch_degrees=scan.patch_degrees or patch_degrees(len(scales)),
                    fpfh_neighbours=scan.fpfh_neighbours, fpfh_normal_neighbours=scan.fpfh_normal_neighbours,
                    scales=scales, normal_neighbours=scan.normal_neighbours,
                    preprocess=PreprocessParams(border=pre.border, plane_threshold=pre.plane_threshold,
                                                plane_removal=pre.plane_removal, cluster_eps=pre.cluster_eps,
                                                remove_plane=pre.remove_plane,
                                                keep_largest_cluster=pre.keep_largest_cluster))


def blur_sigma(scan: ScanSettings, size: int) -> float:
    """3D map blur in pixels: the recipe's, or MuSc-V2's 4 px per 224 px."""
    return scan.blur_sigma if scan.blur_sigma is not None else DEFAULT_SIGMA * size / REFERENCE_SIZE


def fusion_params(mode: str, params: MuscParams, sigma: float) -> FusionParams:
    """MuSc-V2 scoring settings for ``mode`` with the 2D scoring's interval fraction, windows and salient layer."""
    return FusionParams(mode=mode, fraction=params.fraction, windows=params.windows,
                        salient_layer=params.salient_layer, sigma=sigma)


def prepare_scan(cloud: np.ndarray, image: np.ndarray, params: Params3D, black_background: bool,
                 source: str) -> tuple[Sample3D, np.ndarray]:
    """(3D sample, image for the 2D features) of one organised cloud (NaN = missing) and its RGB image.

    With ``black_background`` the image's pixels off the scanned part are zeroed, as MuSc-V2 preprocesses
    MVTec 3D-AD (algorithm.md pitfall 14). Any unusable cloud raises :class:`CloudError` naming ``source``.
    """
    try:
        sample = prepare_3d(cloud, params, source)
        if not black_background:
            return sample, image
        return sample, zero_background(image, foreground_mask(cloud, params.preprocess, source))
    except CloudError:
        raise
    except ValueError as exc:  # degenerate geometry (e.g. every point identical) is a scanner problem too
        raise CloudError(f"{source}: {exc}") from exc


class ScanPool(PoolMembers):
    """Fixed-capacity FIFO pool of scanned parts of one recipe: 2D feature sets and 3D samples.

    Admission, capacity, ``min_size``, golden members and same-part exclusion work as in
    :class:`edge_app.pool.FeaturePool` (FIFO eviction only). 2D sets are kept in float16 (what is persisted)
    with a float32 working copy, so a restored pool scores identically; 3D layers stay float32. A member
    keeps what scoring reads of its 3D sample (layers, centres, centre pixels, curvature, map propagation);
    group member pixels are dropped. Near-duplicates are measured on the 2D sets only: hand-crafted 3D
    descriptors cannot tell a re-scan of one part from another part of the same type, so a ``3d`` pool
    relies on part ids alone.
    """

    def __init__(self, mode: str, capacity: int, n_sets: int, patches: int, dim: int, image_size: int, *,
                 min_size: int = 10, sigma: float = DEFAULT_SIGMA):
        if mode not in SCAN_MODES:
            raise ValueError(f"unknown scan pool mode {mode!r}: expected one of {SCAN_MODES}")
        self._init_members(capacity, min_size)
        self.mode = mode
        self.image_size, self.sigma = image_size, sigma
        self.n_sets = n_sets if mode == "2d+3d" else 0
        self.patches, self.dim = patches, dim
        self.sets16 = np.zeros((self.n_sets, capacity, patches, dim), np.float16)
        self.work = np.zeros((self.n_sets, capacity, patches, dim), np.float32)
        self.layers: np.ndarray | None = None     # [L, capacity, G, F], shaped by the first member
        self.features: np.ndarray | None = None   # [capacity, F] re-scoring features
        self.geometry: list[Sample3D | None] = [None] * capacity   # members' samples without layers

    def fusion(self, params: MuscParams) -> FusionParams:
        return fusion_params(self.mode, params, self.sigma)

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(self, query: PreparedScan, grid: tuple[int, int] | None, params: MuscParams,
              exclude_part_id: str | None = None) -> ScanScore:
        """Score a prepared scan against the pool, excluding members with its own part id."""
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
        result = score_one(query.sets or None, query.sample, pool_2d, pool_3d, grid, self.image_size,
                           self.fusion(params))
        pool_raw = self.raw_scores[members]
        score = rescore_one(result.raw, result.feature, pool_raw, self.features[members],
                            pool_range(pool_raw, params.pool_quantiles), params.windows)
        return ScanScore(result.map, result.raw, score, result.feature, n_refs)

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

    # -- membership ------------------------------------------------------------------------------------------
    def nearest_distance(self, query_sets: Sequence[np.ndarray]) -> float:
        """Mean nearest-patch 2D distance of a part to its closest member (inf without 2D or members),
        on the same scale as :meth:`edge_app.pool.FeaturePool.nearest_distance`."""
        if self.size == 0 or not query_sets:
            return float("inf")
        closeness = sum(patch_to_sample_distances(q, self.work[s, :self.size]).mean(axis=0)
                        for s, q in enumerate(query_sets))
        return float(np.min(closeness)) / len(query_sets)

    def _slot_to_fill(self) -> int | None:
        return self.size if self.size < self.capacity else self._oldest_unfrozen()

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

    # -- persistence (edge_app.runtime.pool_store) -------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist; the members' propagations are concatenated, with per-member point counts."""
        n = self.size
        geo = self.geometry[:n]
        state = {"sets16": self.sets16[:, :n], "raw_scores": self.raw_scores[:n],
                 "part_ids": np.array(self.part_ids[:n], dtype=object).astype(str),
                 "admitted_seq": self.admitted_seq[:n], "admitted_time": self.admitted_time[:n],
                 "golden": self.golden[:n], "admissions": np.array(self.admissions)}
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
        self.size = n


def _geometry(sample: Sample3D) -> Sample3D:
    """What a pool keeps of a sample besides its layers (stored apart): no layers, no group member pixels,
    32-bit indices."""
    prop = sample.propagation
    return dataclasses.replace(sample, layers=(), group_pixels=_NO_MEMBERS,
                               centre_pixels=sample.centre_pixels.astype(np.int32),
                               propagation=Propagation(prop.index.astype(np.int32), prop.weight,
                                                       prop.pixel_ids.astype(np.int32), prop.size))


FeatureStage = Callable[[list[np.ndarray]], list]   # RGB images -> objects with a ``sets`` attribute


class ScanRecipePool:
    """A ``3d`` / ``2d+3d`` recipe: its pool, how its scans are prepared, and its inspection and admission."""

    def __init__(self, name: str, settings: RecipeSettings, n_sets: int, patches: int, dim: int,
                 image_size: int, params: MuscParams):
        if settings.modality not in SCAN_MODES:
            raise ValueError(f"recipe {name!r} has modality {settings.modality!r}; a scan pool needs one of "
                             f"{SCAN_MODES}")
        if settings.modality == "2d+3d" and params.aggregation == "lnamd":
            raise ValueError(f"recipe {name!r}: 2d+3d pairs 2D layers with 3D layers, but scoring.aggregation "
                             "lnamd gives one 2D set per (layer, degree); use snamd")
        self.name, self.settings, self.modality = name, settings, settings.modality
        scan = settings.scan_settings
        try:
            self.params3d = scan_params(scan, self.modality, image_size, n_sets)
        except ValueError as exc:
            raise ValueError(f"recipes.{name}.{exc}") from None
        if not 0 <= params.salient_layer < len(self.params3d.scales):
            raise ValueError(f"scoring.salient_layer {params.salient_layer} is out of range for recipe {name!r} "
                             f"with {len(self.params3d.scales)} 3D layers")
        self.black_background = scan.zero_background and self.modality == "2d+3d"
        ps = settings.pool
        self.pool = ScanPool(self.modality, ps.capacity, n_sets, patches, dim, image_size, min_size=ps.min_size,
                             sigma=blur_sigma(scan, image_size))
        self.threshold = settings.threshold
        self.rejected_duplicates = 0

    def identity(self) -> dict:
        """What, besides the feature model, a stored pool of this recipe must have been built with."""
        return {"modality": self.modality, "scan": self.settings.scan_settings.model_dump(mode="json")}

    def prepare(self, part: PartRecord, features: FeatureStage) -> PreparedScan:
        """Check the part's cloud against its decoded image, prepare it, and compute the 2D sets (2d+3d)."""
        where = f"part {part.part_id}" + (f" ({part.source_ref})" if part.source_ref else "")
        problem = cloud_problem(part.cloud)
        if problem is not None:
            raise CloudError(f"{where}: {problem}")
        cloud = to_organised(part.cloud, where, part.image.shape)
        sample, image = prepare_scan(cloud, part.image, self.params3d, self.black_background, where)
        sets = features([image])[0].sets if self.modality == "2d+3d" else []
        return PreparedScan(sets, sample)

    def inspect(self, part: PartRecord, features: FeatureStage, grid: tuple[int, int],
                params: MuscParams) -> tuple[PartRecord, PreparedScan | None]:
        """Fill a decoded ``part``'s verdict, reason, scores, map and stage times (the inspector decodes).
        Never raises for a bad part."""
        t1 = time.monotonic()
        try:
            prepared = self.prepare(part, features)
        except CloudError as exc:
            part.times.features = time.monotonic() - t1
            return part.decide(Verdict.NO_VERDICT, Reason.SCANNER_ERROR, str(exc)), None
        except Exception as exc:  # the engine must never take the line down with it
            log.exception("feature stage failed on part %s", part.part_id)
            part.times.features = time.monotonic() - t1
            return part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"{type(exc).__name__}: {exc}"), None
        part.times.features = time.monotonic() - t1
        part, prepared, result = verdict_from_pool(
            part, prepared, self.threshold,
            lambda: self.pool.score(prepared, grid, params, exclude_part_id=part.part_id))
        if result is not None:
            part.anomaly_map = result.map
        return part, prepared

    def admit(self, part: PartRecord, prepared: PreparedScan | None, grid: tuple[int, int],
              params: MuscParams, now: float | None = None) -> bool:
        """Pool admission after a verdict, with the rules of the 2D pools (see ``Inspector.admit``)."""
        if prepared is None:
            return False
        if not isinstance(prepared, PreparedScan):
            raise ValueError(f"recipe {self.name!r} scores {self.modality}: its pool needs scans (image + point "
                             "cloud), not images alone (seed it with edge_app.runtime.multimodal.seed_scans)")
        pool, settings = self.pool, self.settings.pool
        warming = part.reason == Reason.WARMUP
        if not warming and settings.admit == "accepted" and part.verdict != Verdict.ACCEPT:
            return False
        if part.test_part:
            return False
        if pool.nearest_distance(prepared.sets) < settings.near_duplicate_distance:
            self.rejected_duplicates += 1
            return False
        slot = pool.admit(part.part_id, prepared, part.raw_score or 0.0, prepared.feature,
                          now=time.time() if now is None else now)
        if slot is not None and warming and pool.size == pool.min_size:  # the pool has just become ready
            pool.rescore_members(grid, params)
            if pool.drop_outliers():  # defective warm-up parts out; warm-up goes on until min_size again
                pool.rescore_members(grid, params)
        return slot is not None


def seed_scans(recipe: ScanRecipePool, features: FeatureStage, grid: tuple[int, int], params: MuscParams,
               scans: Sequence[tuple[Path, Path]]) -> int:
    """Fill ``recipe``'s pool from ``(image, cloud)`` files of recent unlabeled parts, so a line can start
    warm: admitted as warm-up members (near-duplicates skipped), then scored among themselves. A scan that
    cannot be read or prepared raises naming its file. Returns the pool size."""
    for image_path, cloud_path in scans:
        image = read_image(image_path)
        part = PartRecord(part_id=f"seed:{image_path}", recipe=recipe.name,
                          capture_time=image_path.stat().st_mtime, image=image,
                          cloud=read_cloud(cloud_path, image.shape), source_ref=str(image_path))
        prepared = recipe.prepare(part, features)
        part.decide(Verdict.NO_VERDICT, Reason.WARMUP, "seed")
        recipe.admit(part, prepared, grid, params)
    if recipe.pool.size >= 2:
        recipe.pool.rescore_members(grid, params)
        if recipe.pool.drop_outliers() and recipe.pool.size >= 2:
            recipe.pool.rescore_members(grid, params)
    return recipe.pool.size
