"""``musc-edge eval``: score a dataset category in batch or stream protocol and measure it.

batch  -- every image scored against all others (the papers' transductive protocol).
stream -- images in a seeded shuffled order, each scored only against a FIFO pool of ``pool`` earlier
          images and admitted by the line's own rules (accepted parts only, no near-duplicates, warm-up
          outliers dropped): see :mod:`.stream`. The warm-up images are scored among themselves.
line   -- the line-like protocol (:mod:`.line_protocol`): train/good mixed into test, the line's default
          pool and look-ahead, warm-up images scored once the pool is ready; the batch figure on the same
          images and a per-image CSV (``scores``) beside it.

Images keep their aspect (``fit``, :mod:`musc_edge.edge.geometry`): a category gets one window plan from its median
image shape, each image is scored as the concatenated patches of its windows, and the maps are stitched back
and measured at the scaled image's shape (``size x size`` for square images, as before).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import RecipeSettings
from ..errors import UsageError
from ..features import FeatureEngine, Features
from ..geometry import InputPlan, plan_for, stitch, to_image, windows
from ..overlay import render_overlay, side_by_side
from ..progress import Progress
from ..runtime.recipes import Recipe
from ..score import Prepared
from ..scoring import MuscParams, prepare, score_batch
from .datasets import Sample, load_dataset, read_image
from .line_protocol import label_free, line_samples, write_scores
from .metrics import binary_metrics, compute_metrics
from .stream import StreamScores, WarmupScorer, eval_recipe, stream_scores

# Blocks scored by default: the mid-depth blocks of the default ViT-S/14 localise best (docs/benchmarks.md).
DEFAULT_BLOCKS = (6, 9)
STREAMED_MODES = ("stream", "line")
LINE_RECIPE = RecipeSettings()   # what a line runs when its config says nothing: pool, look-ahead
REPORT_KEYS = ("dataset", "mode", "size", "pool", "n_images", "n_anomalous", "image_auroc", "image_ap",
               "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pro", "seconds")


@dataclass
class EvalSettings:
    dataset: Path
    mode: str = "batch"              # batch | stream | line
    size: int = 224
    fit: str = "tile"                # tile | pad | squash: how non-square images meet the square input
    pool: int = 40                   # stream, line: pool capacity K
    min_pool: int = 10               # stream, line: members needed before scoring starts
    seed: int = 0
    model: Path | None = None
    blocks: tuple[int, ...] = ()     # blocks to score (default: the scoring default of the model)
    params: MuscParams = field(default_factory=MuscParams)
    overlays: Path | None = None
    scores: Path | None = None       # line: per-image CSV (line_protocol.write_scores)
    defect_rate: float | None = None  # line: thin defective images to this share of the stream
    rate: float = 4.0                # line: parts per second (how many later parts the look-ahead waits for)
    orders: int = 1                  # line: stream the same images in this many seeded orders (seed, seed + 1, ...)
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
        raise UsageError(f"blocks {missing} are not outputs of this model (it has {list(model_blocks)})")
    return [features.layers[model_blocks.index(b)] for b in blocks]


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG from its header (the loader has already checked the file)."""
    with open(path, "rb") as f:
        head = f.read(24)
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def category_plan(samples: list[Sample], size: int, patch: int, fit: str) -> InputPlan:
    """The input plan of a category: from its images' median shape, one plan for all (equal patch counts)."""
    return plan_for([image_shape(s.path) for s in samples], size, patch, fit)


def window_features(engine: FeatureEngine, samples: list[Sample], plan: InputPlan, batch_size: int,
                    progress: bool) -> Features:
    """Features of every window of every sample: layers ``[N * n_windows, P, D]`` (sample-major), image tokens
    ``[N, D]`` (the mean over a sample's windows)."""
    chunks = []
    per_batch = max(1, batch_size // plan.n_windows)
    with Progress(len(samples), "features", enabled=progress) as bar:
        for start in range(0, len(samples), per_batch):
            batch = [w for s in samples[start:start + per_batch] for w in windows(read_image(s.path), plan)]
            chunks.append(engine(batch, batch_size))
            bar.advance(len(batch) // plan.n_windows)
    tokens = np.concatenate([c.image_tokens for c in chunks])
    return Features([np.concatenate([c.layers[j] for c in chunks]) for j in range(len(chunks[0].layers))],
                    tokens.reshape(len(samples), plan.n_windows, -1).mean(axis=1), engine.grid)


def sample_sets(layers: list[np.ndarray], plan: InputPlan, params: MuscParams) -> list[np.ndarray]:
    """Aggregated feature sets ``[N, n_windows * P, D]``: each window aggregated on its own grid, then a
    sample's windows concatenated (scored as one sample; its patch map has ``plan.stacked_grid``)."""
    t = plan.n_windows
    sets = prepare(layers, plan.window_grid, params)
    return [fs.reshape(fs.shape[0] // t, t * fs.shape[1], fs.shape[2]) for fs in sets]


def image_maps(patch_maps: np.ndarray, plan: InputPlan, shape: tuple[int, int]) -> np.ndarray:
    """``[N, *plan.stacked_grid]`` patch maps -> ``[N, *shape]`` maps in the image's own geometry."""
    th, tw = plan.window_grid
    return to_image(stitch(patch_maps.reshape(len(patch_maps), plan.n_windows, th, tw), plan), shape)


def run_eval(settings: EvalSettings) -> dict:
    """Score a category and return the report dict (schema: REPORT_KEYS, metrics in percent)."""
    t_start = time.monotonic()
    samples = eval_samples(settings)
    engine = FeatureEngine(settings.model, size=settings.size, threads=settings.threads)
    plan = category_plan(samples, settings.size, engine.manifest.patch_size, settings.fit)

    t0 = time.monotonic()
    features = window_features(engine, samples, plan, settings.batch_size, settings.progress)
    t_features = time.monotonic() - t0

    t0 = time.monotonic()
    layers = select_layers(features, engine.manifest.blocks, settings.blocks)
    sets = sample_sets(layers, plan, settings.params)
    grid = plan.stacked_grid
    if settings.mode == "batch":
        with Progress(len(sets), "scoring", enabled=settings.progress) as bar:   # one step per feature set
            result = score_batch(sets, grid, settings.params, features.image_tokens, on_set_done=bar.advance)
        scored = ScoredSet(result.patch_maps, result.rescored)
    elif settings.mode in STREAMED_MODES:
        n, patches, dim = sets[0].shape

        def new_recipe():
            return eval_recipe("2d", settings.pool, settings.min_pool, settings.params, grid, settings.size,
                               len(sets), patches, dim, **stream_pool_policy(settings))
        tokens = features.image_tokens

        def new_parts():   # fresh each stream: scoring writes a part's re-scoring feature and nearest member into it
            return [Prepared([fs[i] for fs in sets], image_token=tokens[i]) for i in range(n)]

        def warmup(idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
            first = score_batch([fs[idx] for fs in sets], grid, settings.params, tokens[idx])
            return first.patch_maps, first.rescored
        streamed = stream_in_order(settings, new_recipe(), new_parts(), warmup)
        scored = ScoredSet(streamed.maps, streamed.scores)
    else:
        raise ValueError(f"unknown mode {settings.mode!r}: expected one of batch, {', '.join(STREAMED_MODES)}")
    t_scoring = time.monotonic() - t0

    maps = image_maps(scored.patch_maps, plan, plan.scaled)
    batch = None
    if settings.mode == "line":   # the batch protocol on the same images, for the gap
        result = score_batch(sets, grid, settings.params, features.image_tokens)
        batch = image_maps(result.patch_maps, plan, plan.scaled), result.rescored
    report = measure(settings, samples, maps, scored.scores, t_start, t_features, t_scoring, batch)
    if settings.mode == "line":
        add_line_report(report, settings, samples, streamed,
                        order_spread(settings, new_recipe, new_parts, warmup, samples, report["image_auroc"]))
    return report


def eval_samples(settings: EvalSettings) -> list[Sample]:
    """The images ``settings.mode`` scores: the test split, or in line mode the line-like mix."""
    if settings.mode == "line":
        return line_samples(settings.dataset, settings.defect_rate, settings.seed)
    return load_dataset(settings.dataset)


def stream_pool_policy(settings: EvalSettings) -> dict[str, str]:
    """The pool's eviction and score scale: stream mode keeps those its published figures were measured with (a
    FIFO pool, scored on its members' own scores), line mode runs the line's default pool."""
    if settings.mode == "line":
        return {"eviction": LINE_RECIPE.pool.eviction, "scale": LINE_RECIPE.pool.scale}
    return {"eviction": "fifo", "scale": "members"}


def stream_in_order(settings: EvalSettings, recipe, prepared, warmup, seed: int | None = None) -> StreamScores:
    """Stream ``prepared`` through ``recipe`` in the order of ``seed`` (default ``settings.seed``); line mode with
    the line's default look-ahead and its warm-up parts scored once the pool is ready (:mod:`.line_protocol`)."""
    order = np.random.default_rng(settings.seed if seed is None else seed).permutation(len(prepared))
    line = settings.mode == "line"
    with Progress(len(prepared), "scoring", enabled=settings.progress) as bar:
        return stream_scores(recipe, prepared, order, warmup, bar,
                             look_ahead=LINE_RECIPE.look_ahead.parts_at(settings.rate) if line else 0,
                             late_warmup=line)


def order_spread(settings: EvalSettings, new_recipe: Callable[[], Recipe], new_parts: Callable[[], Sequence],
                 warmup: WarmupScorer, samples: list[Sample], first_auroc: float) -> dict | None:
    """Line mode with ``settings.orders`` > 1: the image AUROC (percent) of the same images streamed in the orders
    of seeds ``seed, seed + 1, ...``, each through a fresh recipe and fresh prepared parts (``new_recipe``,
    ``new_parts``: scoring writes into a part; the features are computed once).
    ``first_auroc`` is the figure of ``seed``'s own stream. On a few dozen parts the order alone moves the figure by
    points (cable_gland: 56 to 73 over 20 orders), so one order's figure says little; None for one order."""
    if settings.orders <= 1:
        return None
    labels = np.array([s.label for s in samples])
    seeds = list(range(settings.seed, settings.seed + settings.orders))
    aurocs = [first_auroc]
    quiet, t0 = replace(settings, progress=False), time.monotonic()
    with Progress(len(seeds) - 1, "orders", enabled=settings.progress) as bar:
        for seed in seeds[1:]:
            streamed = stream_in_order(quiet, new_recipe(), new_parts(), warmup, seed)
            aurocs.append(100 * binary_metrics(labels, streamed.scores, "labels")[0])
            bar.advance()
    return {"seeds": seeds, "image_auroc": [round(a, 2) for a in aurocs], "mean": round(float(np.mean(aurocs)), 2),
            "worst": round(min(aurocs), 2), "best": round(max(aurocs), 2), "seconds": round(time.monotonic() - t0, 3)}


def add_line_report(report: dict, settings: EvalSettings, samples: list[Sample], streamed: StreamScores,
                    orders: dict | None = None) -> None:
    """Line mode's additions to ``report``: what the line's first label-free threshold would do, the image AUROC
    over several orders (``orders``, :func:`order_spread`) and the per-image CSV (``settings.scores``)."""
    labels = np.array([s.label for s in samples])
    first = label_free(streamed.scores, labels)
    report["line"] = {"rate": settings.rate, "look_ahead": LINE_RECIPE.look_ahead.parts_at(settings.rate),
                      "eviction": LINE_RECIPE.pool.eviction, "scale": LINE_RECIPE.pool.scale,
                      "warmup_parts": streamed.warmup, "refs_median": float(np.median(streamed.refs)),
                      "defect_rate": round(float(labels.mean()), 4),
                      "label_free_threshold": first.threshold, "good_rejected": first.good_rejected,
                      "defects_rejected": first.defects_rejected, **({"threshold_problem": first.problem}
                                                                      if first.problem else {}),
                      **({"orders": orders} if orders else {})}
    if settings.scores is not None:
        write_scores(settings.scores, samples, streamed.scores, first.threshold, streamed.refs,
                     streamed.warmup_mask)


def load_masks_at(samples: list[Sample], shape: tuple[int, int]) -> np.ndarray:
    """``[N, H, W]`` bool ground truth at ``shape`` (area-resized, > half the mask's peak; any non-zero id of
    MVTec 3D-AD counts); all False where a sample has no mask."""
    import cv2

    h, w = shape
    masks = np.zeros((len(samples), h, w), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is None:
            continue
        mask = read_image(sample.mask_path)[..., 0].astype(np.float32)
        peak = float(mask.max())
        if peak > 0:
            shrinking = h * w < mask.size
            masks[i] = cv2.resize(mask, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR) \
                > 0.5 * peak
    return masks


def measure(settings: EvalSettings, samples, maps: np.ndarray, scores: np.ndarray, t_start: float,
            t_features: float, t_scoring: float, batch: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Metrics of ``maps`` ``[N, H, W]`` (any aspect: the masks are brought to it) and image ``scores`` against
    the samples' ground truth, overlays if asked, and the report dict (REPORT_KEYS, metrics in percent).
    ``batch`` (line mode: the batch protocol's maps and scores on the same images) adds ``report["batch"]``,
    measured against the same masks. Shared by 2D and 3D evaluation."""
    labels = np.array([s.label for s in samples])
    masks = load_masks_at(samples, maps.shape[1:])
    metrics = compute_metrics(labels, scores, masks, maps)
    if settings.overlays:
        write_overlays(settings.overlays, samples, maps, masks, scores, progress=settings.progress)
    report = {"dataset": str(settings.dataset), "mode": settings.mode, "size": settings.size,
              "pool": settings.pool if settings.mode in STREAMED_MODES else None, "n_images": len(samples),
              "n_anomalous": int(labels.sum()), **metrics,
              "seconds": {"features": round(t_features, 3), "scoring": round(t_scoring, 3),
                          "total": round(time.monotonic() - t_start, 3)}}
    report = {key: report[key] for key in REPORT_KEYS}
    if batch is not None:
        report["batch"] = compute_metrics(labels, batch[1], masks, batch[0])
    return report


def write_overlays(folder: Path, samples, maps: np.ndarray, masks: np.ndarray, scores: np.ndarray,
                   progress: bool = False) -> None:
    """One [image | heat map | ground truth] PNG per sample at the maps' geometry, all on one colour scale."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = np.percentile(maps, [1.0, 99.9])
    h, w = maps.shape[1:]
    with Progress(len(samples), "overlays", enabled=progress) as bar:
        for sample, amap, mask, score in zip(samples, maps, masks, scores):
            image = cv2.resize(read_image(sample.path), (w, h), interpolation=cv2.INTER_AREA)
            over = render_overlay(image, amap, lo, hi, caption=f"{score:.3f}")
            name = f"{sample.defect_type}_{Path(sample.path).stem}.png"
            cv2.imwrite(str(folder / name), cv2.cvtColor(side_by_side(image, over, mask), cv2.COLOR_RGB2BGR))
            bar.advance()


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
    if "batch" in report:   # line mode: the batch protocol on the same images, and the first calibration
        batch, line = report["batch"], report["line"]
        lines[6:6] = [f"batch      {pct(batch['image_auroc'])}  {pct(batch['image_ap'])}  {pct(batch['image_f1max'])}"
                      f"  (image; pixel AUROC {pct(batch['pixel_auroc']).strip()}, PRO {pct(batch['pro']).strip()})"]
        share = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
        lines += [f"line       {line['rate']:g} parts/s: look-ahead {line['look_ahead']}, pool {line['eviction']} "
                  f"({line['scale']} scale), {line['warmup_parts']} warm-up parts, median {line['refs_median']:.0f} references",
                  f"label-free threshold (1 % false rejects): "
                  + (f"{line['label_free_threshold']:.4f}: good rejected {share(line['good_rejected'])}, "
                     f"defective rejected {share(line['defects_rejected'])}" if line["label_free_threshold"]
                     is not None else line.get("threshold_problem", "none"))]
        if "orders" in line:
            orders = line["orders"]
            lines.append(f"orders     image AUROC over {len(orders['seeds'])} orders (seeds {orders['seeds'][0]}-"
                         f"{orders['seeds'][-1]}): mean {orders['mean']:.2f}, worst {orders['worst']:.2f}, "
                         f"best {orders['best']:.2f}")
    return "\n".join(lines)
