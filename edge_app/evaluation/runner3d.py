"""``musc-edge eval --modality 3d | 2d+3d``: score an MVTec 3D-AD category (``test/<type>/{rgb,xyz,gt}``) with
MuSc-V2's 3D or fused 2D+3D scoring, in the batch or stream protocol of :mod:`.runner`, with the same report.

Each cloud is prepared on the ``size x size`` grid of the image (the two stay pixel-aligned); in 2d+3d mode
the image's pixels off the scanned part are zeroed before the 2D features, as MuSc-V2's 3D preprocessing
does (it rewrites the RGB too; ../shared/docs/algorithm.md §6).
Stream mode scores through the line's own scan recipe and admission rules (:mod:`.stream`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..config import ScanSettings
from ..errors import UsageError
from ..features import FeatureEngine, Features
from ..pointcloud import read_cloud
from ..progress import Progress
from ..runtime.recipes.recipe_scan import blur_sigma, prepare_scan, scan_params
from ..scan_pool import SCAN_MODES, fusion_params
from ..score import PreparedScan
from ..scoring import prepare
from ..scoring3d import Sample3D, score_batch
from .datasets import DatasetError, Sample, read_image
from .runner import (STREAMED_MODES, EvalSettings, add_line_report, eval_samples, measure, order_spread,
                     select_layers, stream_in_order, stream_pool_policy)
from .stream import eval_recipe


@dataclass
class Eval3DSettings(EvalSettings):
    modality: str = "2d+3d"          # 3d | 2d+3d
    scan: ScanSettings = field(default_factory=ScanSettings)


def check_clouds(samples: list[Sample]) -> None:
    """Every sample must have its ``xyz`` cloud; DatasetError naming the first one without."""
    missing = [s for s in samples if s.xyz_path is None]
    if missing:
        folder = missing[0].path.parent.parent
        raise DatasetError(f"{folder} has no xyz folder of point clouds for {missing[0].path} "
                           f"({len(missing)} of {len(samples)} images lack one); 3D scoring needs the MVTec 3D-AD "
                           "layout test/<type>/{rgb,xyz,gt} with xyz/<id>.tiff")


def prepare_samples(settings: Eval3DSettings, samples: list[Sample], engine: FeatureEngine | None,
                    n_sets: int) -> tuple[list[Sample3D], list[np.ndarray] | None]:
    """3D samples of every cloud and, in 2d+3d mode, the 2D feature sets ``[N, P, D]`` of the images."""
    params3d = scan_params(settings.scan, settings.modality, settings.size, n_sets)
    black_background = settings.scan.zero_background and settings.modality == "2d+3d"
    samples_3d, chunks, batch = [], [], []
    with Progress(len(samples), "scans", enabled=settings.progress) as bar:
        for i, s in enumerate(samples):
            image = read_image(s.path)
            cloud = read_cloud(s.xyz_path, image.shape)
            sample, image = prepare_scan(cloud, image, params3d, black_background, str(s.xyz_path))
            samples_3d.append(sample)
            if engine is not None:
                batch.append(image)
                if len(batch) == settings.batch_size or i == len(samples) - 1:
                    chunks.append(engine(batch, settings.batch_size))
                    batch = []
            bar.advance()
    if engine is None:
        return samples_3d, None
    features = Features([np.concatenate([c.layers[j] for c in chunks]) for j in range(len(chunks[0].layers))],
                        np.concatenate([c.image_tokens for c in chunks]), engine.grid)
    layers = select_layers(features, engine.manifest.blocks, settings.blocks)
    return samples_3d, prepare(layers, engine.grid, settings.params)


def run_eval3d(settings: Eval3DSettings) -> dict:
    """Score a category with 3D or 2D+3D scoring; the report has the 2D runner's schema (REPORT_KEYS)."""
    if settings.modality not in SCAN_MODES:
        raise ValueError(f"unknown modality {settings.modality!r}: expected one of {SCAN_MODES}")
    if settings.mode not in ("batch", *STREAMED_MODES):
        raise ValueError(f"unknown mode {settings.mode!r}: expected one of batch, {', '.join(STREAMED_MODES)}")
    t_start = time.monotonic()
    samples = eval_samples(settings)
    check_clouds(samples)
    engine = None
    n_sets, grid = 0, None
    if settings.modality == "2d+3d":
        if settings.params.aggregation == "lnamd":
            raise UsageError("2d+3d pairs 2D layers with 3D layers; aggregation lnamd gives one 2D set per "
                             "(layer, degree): use snamd")
        engine = FeatureEngine(settings.model, size=settings.size, threads=settings.threads)
        n_sets, grid = len(settings.blocks or engine.manifest.blocks), engine.grid

    t0 = time.monotonic()
    samples_3d, sets = prepare_samples(settings, samples, engine, n_sets)
    t_features = time.monotonic() - t0

    t0 = time.monotonic()
    sigma = blur_sigma(settings.scan, settings.size)
    fusion = fusion_params(settings.modality, settings.params, sigma, settings.scan.image_distance)
    if settings.mode == "batch":
        result = score_batch(sets, samples_3d, grid, settings.size, fusion)
        maps, scores = result.maps, result.rescored
    else:
        def new_recipe():
            return eval_recipe(settings.modality, settings.pool, settings.min_pool, settings.params, grid,
                               settings.size, n_sets, grid[0] * grid[1] if grid else 0,
                               sets[0].shape[2] if sets else 0, settings.scan, **stream_pool_policy(settings))

        def new_parts():   # fresh each stream: scoring writes a part's re-scoring feature into it
            return [PreparedScan([fs[i] for fs in sets] if sets else [], s) for i, s in enumerate(samples_3d)]

        def warmup(idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
            first = score_batch([fs[idx] for fs in sets] if sets else None, [samples_3d[i] for i in idx], grid,
                                settings.size, fusion)
            return first.maps, first.rescored
        streamed = stream_in_order(settings, new_recipe(), new_parts(), warmup)
        maps, scores = streamed.maps, streamed.scores
    t_scoring = time.monotonic() - t0

    batch = None
    if settings.mode == "line":   # the batch protocol on the same images, for the gap
        result = score_batch(sets, samples_3d, grid, settings.size, fusion)
        batch = result.maps, result.rescored
    report = measure(settings, samples, maps, scores, t_start, t_features, t_scoring, batch)
    if settings.mode == "line":
        add_line_report(report, settings, samples, streamed,
                        order_spread(settings, new_recipe, new_parts, warmup, samples, report["image_auroc"]))
    return report
