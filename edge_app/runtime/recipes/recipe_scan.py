"""3D and 2D+3D (MuSc-V2) recipes on the line: per-part scan preparation, a pool of scans, inspection, admission.

A ``3d`` / ``2d+3d`` recipe scores each part's organised cloud (and, fused, its image) one-vs-pool with
:func:`edge_app.scoring3d.score_one`. The cloud is scored on the ``model.size`` grid of the image, so the
two stay pixel-aligned for CAE and the summed map. Every problem with the cloud (missing, not ``[H, W, 3]``,
no valid point, a size other than the image's, absurd coordinates, nothing left after background removal)
decides the part NO_VERDICT / SCANNER_ERROR with the reason in ``detail``; it never raises.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...config import RecipeSettings, ScanSettings
from ...evaluation.datasets import read_image
from ...pointcloud import CloudError, PreprocessParams, foreground_mask, read_cloud, to_organised, zero_background
from ...record import PartRecord, Reason, Verdict
from ...scan_pool import SCAN_MODES, PreparedScan, ScanPool
from ...scoring import MuscParams
from ...scoring3d import Params3D, Sample3D, prepare_3d
from ...scoring3d.map3d import DEFAULT_SIGMA
from ...sources.scanner import cloud_problem
from ..verdict import verdict_from_pool

log = logging.getLogger(__name__)

REFERENCE_SIZE = 224   # grid side the MuSc-V2 3D defaults (blur sigma) are given for


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
    return Params3D(size=size, n_groups=scan.n_groups, group_size=scan.group_size, grouping=scan.grouping,
                    scales=descriptor_scales(scan, modality, n_2d_sets), normal_neighbours=scan.normal_neighbours,
                    preprocess=PreprocessParams(border=pre.border, plane_threshold=pre.plane_threshold,
                                                plane_removal=pre.plane_removal, cluster_eps=pre.cluster_eps,
                                                remove_plane=pre.remove_plane,
                                                keep_largest_cluster=pre.keep_largest_cluster))


def blur_sigma(scan: ScanSettings, size: int) -> float:
    """3D map blur in pixels: the recipe's, or MuSc-V2's 4 px per 224 px."""
    return scan.blur_sigma if scan.blur_sigma is not None else DEFAULT_SIGMA * size / REFERENCE_SIZE


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
                             "cloud), not images alone (seed it with edge_app.runtime.recipes.recipe_scan.seed_scans)")
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
