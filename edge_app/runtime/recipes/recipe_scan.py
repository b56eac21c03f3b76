"""``3d`` and ``2d+3d`` (MuSc-V2) recipes: each part's scan scored against a :class:`~musc_edge.edge.scan_pool.ScanPool`.

A ``3d`` / ``2d+3d`` recipe scores each part's organised cloud (and, fused, its image) one-vs-pool with
:func:`musc_edge.edge.scoring3d.score_one`. The cloud is scored on the ``model.size`` grid of the image, so the
two stay pixel-aligned for CAE and the summed map: by default the part's canonical view (``scan.pose``), both
cropped to the part and turned to its axis; the map comes back on the frame's grid. Every problem with the
cloud (missing, not ``[H, W, 3]``, no valid point, a size other than the image's, absurd coordinates, nothing
left after background removal) decides the part NO_VERDICT / SCANNER_ERROR with the reason in ``detail``; it
never raises.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

import numpy as np

from ...config import ConfigError, RecipeSettings, ScanSettings
from ...errors import UsageError
from ...mediaio import read_image
from ...pointcloud import (CloudError, PreparedCloud, PreprocessParams, prepare_cloud, read_cloud, to_organised,
                           warp_image, zero_background)
from ...progress import Progress
from ...record import PartRecord
from ...scan_pool import SCAN_MODES, ScanPool
from ...score import PoolScore, PreparedScan
from ...scoring3d import Params3D, Sample3D, patch_degrees, sample_from_cloud
from ...scoring3d.multimodal import pose_margin
from ...scoring3d.map3d import DEFAULT_SIGMA
from ...sources.scanner import CLOUD_SUFFIXES, cloud_problem
from .base import Recipe, Scoring, image_files

log = logging.getLogger(__name__)

REFERENCE_SIZE = 224   # grid side the MuSc-V2 3D defaults (blur sigma) are given for
T = TypeVar("T")


def descriptor_scales(scan: ScanSettings, modality: str, n_2d_sets: int) -> tuple[float, ...]:
    """The 3D layers' descriptor scales: explicit, or halving down from 1.0, one per 2D set (2d+3d) or three."""
    count = n_2d_sets if modality == "2d+3d" else 3
    scales = scan.scales or tuple(2.0 ** -(count - 1 - i) for i in range(count))
    if modality == "2d+3d" and len(scales) != n_2d_sets:
        raise ConfigError(f"scan.scales gives {len(scales)} 3D layers but the 2D side has {n_2d_sets} feature "
                         "sets (model.blocks); 2d+3d pairs them layer by layer")
    return tuple(scales)


def scan_params(scan: ScanSettings, modality: str, size: int, n_2d_sets: int) -> Params3D:
    """How a recipe's clouds become :class:`Sample3D` on a ``size x size`` grid."""
    pre = scan.preprocess
    scales = descriptor_scales(scan, modality, n_2d_sets)
    return Params3D(size=size, n_groups=scan.n_groups, group_size=scan.group_size, grouping=scan.grouping,
                    tokens=scan.tokens, pose=scan.pose, pose_margin=scan.pose_margin, patch_pixels=scan.patch_pixels,
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


def prepare_scan(cloud: np.ndarray, image: np.ndarray, params: Params3D, black_background: bool,
                 source: str) -> tuple[Sample3D, np.ndarray]:
    """(3D sample, image for the 2D features) of one organised cloud (NaN = missing) and its RGB image.

    With ``black_background`` the image's pixels off the scanned part are zeroed, as MuSc-V2 preprocesses
    MVTec 3D-AD (MuSc-V2 code, ``datasets/``). With ``params.pose`` ``axis`` the image is warped to the part's
    canonical view with the cloud (``size x size``). Any unusable cloud raises :class:`CloudError` naming
    ``source``.
    """
    prepared, view = _prepare_view(cloud, image, params, black_background, source)
    return _sample(prepared, params, source), view


def prepare_scan_with(cloud: np.ndarray, image: np.ndarray, params: Params3D, black_background: bool,
                      source: str, image_stage: Callable[[np.ndarray], T]) -> tuple[Sample3D, T]:
    """(3D sample, ``image_stage(image for the 2D features)``), as :func:`prepare_scan`, with the image stage
    (the 2D feature model: ONNX Runtime, which releases the GIL) on a second thread while this one computes
    the cloud's FPFH, so the two share the cores. A cloud error is raised once the image stage has finished;
    the image stage's own errors are raised as they are."""
    prepared, view = _prepare_view(cloud, image, params, black_background, source)
    stage = _image_stage_thread().submit(image_stage, view)
    try:
        sample = _sample(prepared, params, source)
    except BaseException:
        wait([stage])
        raise
    return sample, stage.result()


def _prepare_view(cloud: np.ndarray, image: np.ndarray, params: Params3D, black_background: bool,
                  source: str) -> tuple[PreparedCloud, np.ndarray]:
    """The preprocessed cloud and the image for the 2D features (background zeroed, canonical view)."""
    try:
        prepared = prepare_cloud(cloud, params.size, params.preprocess, source, pose_margin(params))
        if black_background:
            image = zero_background(image, prepared.foreground)
        return prepared, image if prepared.affine is None else warp_image(image, prepared.affine, params.size)
    except CloudError:
        raise
    except ValueError as exc:  # degenerate geometry (e.g. every point identical) is a scanner problem too
        raise CloudError(f"{source}: {exc}") from exc


def _sample(prepared: PreparedCloud, params: Params3D, source: str) -> Sample3D:
    try:
        return sample_from_cloud(prepared, params, source)
    except CloudError:
        raise
    except ValueError as exc:
        raise CloudError(f"{source}: {exc}") from exc


_IMAGE_STAGE: ThreadPoolExecutor | None = None
_IMAGE_STAGE_LOCK = threading.Lock()


def _image_stage_thread() -> ThreadPoolExecutor:
    """The one thread that runs scans' image stages (created on first use)."""
    global _IMAGE_STAGE
    with _IMAGE_STAGE_LOCK:
        if _IMAGE_STAGE is None:
            _IMAGE_STAGE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scan-image-stage")
        return _IMAGE_STAGE


def _forget_image_stage() -> None:
    """A forked child has none of its parent's threads: it starts its own image stage thread when it needs one."""
    global _IMAGE_STAGE, _IMAGE_STAGE_LOCK
    _IMAGE_STAGE, _IMAGE_STAGE_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_image_stage)


class ScanRecipe(Recipe):
    """A ``3d`` / ``2d+3d`` recipe: its :class:`ScanPool` (FIFO) and how a scanned part is prepared."""

    def __init__(self, name: str, settings: RecipeSettings, scoring: Scoring, n_sets: int, patches: int,
                 dim: int):
        if settings.modality not in SCAN_MODES:
            raise ConfigError(f"recipe {name!r} has modality {settings.modality!r}; a scan pool needs one of "
                             f"{SCAN_MODES}")
        params, image_size = scoring.params, scoring.image_size
        if settings.modality == "2d+3d" and params.aggregation == "lnamd":
            raise ConfigError(f"recipe {name!r}: 2d+3d pairs 2D layers with 3D layers, but scoring.aggregation "
                             "lnamd gives one 2D set per (layer, degree); use snamd")
        super().__init__(name, settings, scoring)
        self.modality = settings.modality
        scan = settings.scan_settings
        try:
            self.params3d = scan_params(scan, self.modality, image_size, n_sets)
        except ValueError as exc:
            raise ConfigError(f"recipes.{name}.{exc}") from None
        if not 0 <= params.salient_layer < len(self.params3d.scales):
            raise ConfigError(f"scoring.salient_layer {params.salient_layer} is out of range for recipe {name!r} "
                             f"with {len(self.params3d.scales)} 3D layers")
        self.black_background = scan.zero_background and self.modality == "2d+3d"
        ps = settings.pool
        self.pool = ScanPool(self.modality, ps.capacity, n_sets, patches, dim, image_size, min_size=ps.min_size,
                             sigma=blur_sigma(scan, image_size), eviction=ps.eviction, scale=ps.scale,
                             image_distance=scan.image_distance)

    @staticmethod
    def default_near_duplicate_distance(settings: RecipeSettings) -> float:
        """0.05 in the canonical view, where different parts look more alike: different synthetic scans 0.065
        and more, different real cable glands (MVTec 3D-AD) 0.11 and more, a noisy re-scan of one 0.02."""
        scan = settings.scan_settings
        return 0.05 if scan.pose == "axis" and settings.modality == "2d+3d" else 0.1

    def identity(self) -> dict:
        """The feature model's identity, plus the modality and 3D settings that make the tokens (not
        ``image_distance``: the stored tokens serve either; see :meth:`load_state`)."""
        scan = self.settings.scan_settings.model_dump(mode="json")
        del scan["image_distance"]
        return {**super().identity(), "modality": self.modality, "scan": scan}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore the pool; members scored with another image distance (releases before it: Euclidean) are
        scored again among themselves, which re-freezes the scale on today's image scores."""
        super().load_state(state)
        stored = str(state["image_distance"]) if "image_distance" in state else "euclidean"
        if stored != self.pool.image_distance and self.pool.size >= 2:
            log.warning("recipe %s: the stored pool's members were scored with the %s image distance; scoring them "
                        "again with %s (their scale is frozen anew: check the threshold with musc-calibrate)",
                        self.name, stored, self.pool.image_distance)
            self.pool.rescore_members(self.scoring.grid, self.scoring.params)

    def prepare(self, part: PartRecord) -> PreparedScan:
        """Check the part's cloud against its decoded image, prepare it, and compute the 2D sets (2d+3d)."""
        where = f"part {part.part_id}" + (f" ({part.source_ref})" if part.source_ref else "")
        problem = cloud_problem(part.cloud)
        if problem is not None:
            raise CloudError(f"{where}: {problem}")
        cloud = to_organised(part.cloud, where, part.image.shape)
        if self.modality != "2d+3d":
            return PreparedScan([], prepare_scan(cloud, part.image, self.params3d, self.black_background, where)[0])
        sample, sets = prepare_scan_with(cloud, part.image, self.params3d, self.black_background, where,
                                         lambda image: self.scoring.features([image])[0])
        return PreparedScan(sets, sample)

    def score(self, prepared: PreparedScan, part_id: str | None = None,
              look_ahead: Sequence[PreparedScan] = ()) -> PoolScore:
        return self.pool.score(prepared, self.scoring.grid, self.scoring.params, exclude_part_id=part_id,
                               look_ahead=look_ahead)

    def read_seed(self, folder: str | Path, progress: bool = False) -> list[tuple[PartRecord, PreparedScan]]:
        """The folder's scans (see :func:`scan_files`), read and prepared."""
        return self.read_scans(scan_files(folder), progress)

    def read_scans(self, scans: Sequence[tuple[Path, Path]],
                   progress: bool = False) -> list[tuple[PartRecord, PreparedScan]]:
        """``(image, cloud)`` files read and prepared; a scan that cannot be read or prepared raises naming
        its file."""
        out = []
        with Progress(len(scans), "seeding", enabled=progress) as bar:
            for image_path, cloud_path in scans:
                image = read_image(image_path)
                part = PartRecord(part_id=f"seed:{image_path}", recipe=self.name,
                                  capture_time=image_path.stat().st_mtime, image=image,
                                  cloud=read_cloud(cloud_path, image.shape), source_ref=str(image_path))
                out.append((part, self.prepare(part)))
                part.image = part.cloud = None  # the prepared scan has what the pool keeps
                bar.advance()
        return out

    def _nearest(self, prepared: PreparedScan) -> float:
        return self.pool.nearest_distance(self._checked(prepared).sets)

    def _store(self, part_id: str, prepared: PreparedScan, raw_score: float, now: float) -> int | None:
        return self.pool.admit(part_id, self._checked(prepared), raw_score, prepared.feature, now=now)

    def _checked(self, prepared) -> PreparedScan:
        if not isinstance(prepared, PreparedScan):
            raise UsageError(f"recipe {self.name!r} scores {self.modality}: its pool needs scans (image + point "
                             "cloud), not images alone")
        return prepared


def scan_files(folder: str | Path) -> list[tuple[Path, Path]]:
    """``(image, cloud)`` pairs under ``folder``: MVTec 3D-AD's ``<..>/rgb/<id>.png`` with ``../xyz/<id>.tiff``
    when the folder has ``rgb`` folders, else every image with a cloud of the same stem beside it
    (FileNotFoundError naming the first image without one)."""
    images = image_files(folder)
    mvtec = [p for p in images if p.parent.name == "rgb"]
    pairs = []
    for image in mvtec or images:
        candidates = ([image.parent.parent / "xyz" / f"{image.stem}.tiff"] if mvtec else
                      [image.with_suffix(s) for s in CLOUD_SUFFIXES])
        cloud = next((c for c in candidates if c.is_file()), None)
        if cloud is None:
            raise FileNotFoundError(f"no point cloud for {image} (looked for "
                                    f"{', '.join(c.name for c in candidates)}); a scan recipe seeds from "
                                    "image + cloud pairs")
        pairs.append((image, cloud))
    return pairs
