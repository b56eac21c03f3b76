"""``musc-edge eval``: score a dataset category in batch or stream protocol and measure it.

batch  -- every image scored against all others (the papers' transductive protocol).
stream -- images in a seeded shuffled order; each is scored only against a FIFO pool of the previous
          ``pool`` images (the line's protocol, through the runtime's own :class:`FeaturePool`); the first
          ``min_pool`` images are scored among themselves once there are enough of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..features import FeatureEngine, Features
from ..overlay import render_overlay, side_by_side
from ..pool import FeaturePool
from ..progress import Progress
from ..scoring import MuscParams, prepare, score_batch, upsample
from .datasets import load_dataset, load_masks, read_image
from .metrics import compute_metrics

# Blocks scored by default: the mid-depth blocks of the default ViT-S/14 localise best (see README).
DEFAULT_BLOCKS = (6, 9)
REPORT_KEYS = ("dataset", "mode", "size", "pool", "n_images", "n_anomalous", "image_auroc", "image_ap",
               "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pro", "seconds")


@dataclass
class EvalSettings:
    dataset: Path
    mode: str = "batch"              # batch | stream
    size: int = 224
    pool: int = 40                   # stream: pool capacity K
    min_pool: int = 10               # stream: members needed before scoring starts
    seed: int = 0
    model: Path | None = None
    blocks: tuple[int, ...] = ()     # blocks to score (default: the scoring default of the model)
    params: MuscParams = field(default_factory=MuscParams)
    overlays: Path | None = None
    batch_size: int = 8
    threads: int | None = None
    progress: bool = True


@dataclass
class ScoredSet:
    patch_maps: np.ndarray   # [N, h, w]
    scores: np.ndarray       # [N] re-scored image scores


def select_layers(features: Features, model_blocks: tuple[int, ...], blocks: tuple[int, ...]) -> list[np.ndarray]:
    """The token arrays of ``blocks`` (all of the model's blocks when empty)."""
    if not blocks:
        return list(features.layers)
    missing = [b for b in blocks if b not in model_blocks]
    if missing:
        raise ValueError(f"blocks {missing} are not outputs of this model (it has {list(model_blocks)})")
    return [features.layers[model_blocks.index(b)] for b in blocks]


def stream_scores(sets: list[np.ndarray], grid: tuple[int, int], order: np.ndarray, capacity: int,
                  min_pool: int, params: MuscParams, progress: Progress | None = None,
                  image_tokens: np.ndarray | None = None, scorer: str = "numpy") -> ScoredSet:
    """Score samples in ``order``, each against a FIFO pool of the previous ``capacity`` samples."""
    n, p, d = sets[0].shape
    if n < min_pool:
        raise ValueError(f"stream mode needs at least min_pool={min_pool} images, the dataset has {n}")
    pool = FeaturePool(capacity, len(sets), p, d, min_size=min(min_pool, capacity), eviction="fifo",
                       scorer=scorer)
    maps = np.zeros((n, *grid), np.float32)
    scores = np.zeros(n)
    warmup = list(order[:pool.min_size])
    first = score_batch([fs[warmup] for fs in sets], grid, params,
                        None if image_tokens is None else image_tokens[warmup])
    for j, i in enumerate(warmup):
        maps[i], scores[i] = first.patch_maps[j], first.rescored[j]
        pool.admit(str(i), [fs[i] for fs in sets], first.raw[j], first.features[j])
        progress and progress.advance()
    for i in order[pool.min_size:]:
        member = [fs[i] for fs in sets]
        result = pool.score(member, grid, params, image_token=None if image_tokens is None else image_tokens[i])
        maps[i], scores[i] = result.patch_map, result.score
        pool.admit(str(i), member, result.raw, result.feature)
        progress and progress.advance()
    return ScoredSet(maps, scores)


def run_eval(settings: EvalSettings) -> dict:
    """Score a category and return the report dict (schema: REPORT_KEYS, metrics in percent)."""
    t_start = time.monotonic()
    samples = load_dataset(settings.dataset)
    engine = FeatureEngine(settings.model, size=settings.size, threads=settings.threads)

    t0 = time.monotonic()
    chunks = []
    with Progress(len(samples), "features", enabled=settings.progress) as bar:
        for start in range(0, len(samples), settings.batch_size):
            batch = [read_image(s.path) for s in samples[start:start + settings.batch_size]]
            chunks.append(engine(batch, settings.batch_size))
            bar.advance(len(batch))
    features = Features([np.concatenate([c.layers[j] for c in chunks]) for j in range(len(chunks[0].layers))],
                        np.concatenate([c.image_tokens for c in chunks]), engine.grid)
    t_features = time.monotonic() - t0

    t0 = time.monotonic()
    layers = select_layers(features, engine.manifest.blocks, settings.blocks)
    sets = prepare(layers, engine.grid, settings.params)
    if settings.mode == "batch":
        result = score_batch(sets, engine.grid, settings.params, features.image_tokens)
        scored = ScoredSet(result.patch_maps, result.rescored)
    elif settings.mode == "stream":
        order = np.random.default_rng(settings.seed).permutation(len(samples))
        with Progress(len(samples), "scoring", enabled=settings.progress) as bar:
            scored = stream_scores(sets, engine.grid, order, settings.pool, settings.min_pool, settings.params, bar,
                                   features.image_tokens)
    else:
        raise ValueError(f"unknown mode {settings.mode!r}: expected 'batch' or 'stream'")
    t_scoring = time.monotonic() - t0

    maps = upsample(scored.patch_maps, (settings.size, settings.size))
    return measure(settings, samples, maps, scored.scores, t_start, t_features, t_scoring)


def measure(settings: EvalSettings, samples, maps: np.ndarray, scores: np.ndarray, t_start: float,
            t_features: float, t_scoring: float) -> dict:
    """Metrics of full-resolution ``maps`` and image ``scores`` against the samples' ground truth, overlays
    if asked, and the report dict (REPORT_KEYS, metrics in percent). Shared by 2D and 3D evaluation."""
    labels = np.array([s.label for s in samples])
    masks = load_masks(samples, settings.size)
    metrics = compute_metrics(labels, scores, masks, maps)
    if settings.overlays:
        write_overlays(settings.overlays, samples, maps, masks, scores, settings.size)
    report = {"dataset": str(settings.dataset), "mode": settings.mode, "size": settings.size,
              "pool": settings.pool if settings.mode == "stream" else None, "n_images": len(samples),
              "n_anomalous": int(labels.sum()), **metrics,
              "seconds": {"features": round(t_features, 3), "scoring": round(t_scoring, 3),
                          "total": round(time.monotonic() - t_start, 3)}}
    return {key: report[key] for key in REPORT_KEYS}


def write_overlays(folder: Path, samples, maps: np.ndarray, masks: np.ndarray, scores: np.ndarray,
                   size: int) -> None:
    """One [image | heat map | ground truth] PNG per sample, all on one colour scale."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = np.percentile(maps, [1.0, 99.9])
    for sample, amap, mask, score in zip(samples, maps, masks, scores):
        image = cv2.resize(read_image(sample.path), (size, size), interpolation=cv2.INTER_AREA)
        over = render_overlay(image, amap, lo, hi, caption=f"{score:.3f}")
        name = f"{sample.defect_type}_{Path(sample.path).stem}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(side_by_side(image, over, mask), cv2.COLOR_RGB2BGR))


def format_report(report: dict) -> str:
    """The report as an aligned table."""
    def pct(v):
        return "   n/a" if v is None else f"{v:6.2f}"

    lines = [f"dataset  {report['dataset']}",
             f"mode     {report['mode']}  size {report['size']}  pool {report['pool']}  "
             f"images {report['n_images']} ({report['n_anomalous']} anomalous)",
             "",
             "            AUROC      AP  F1-max     PRO",
             f"image      {pct(report['image_auroc'])}  {pct(report['image_ap'])}  {pct(report['image_f1max'])}",
             f"pixel      {pct(report['pixel_auroc'])}  {pct(report['pixel_ap'])}  {pct(report['pixel_f1max'])}  "
             f"{pct(report['pro'])}",
             "",
             "seconds    features {features:.1f}  scoring {scoring:.1f}  total {total:.1f}".format(**report["seconds"])]
    return "\n".join(lines)
