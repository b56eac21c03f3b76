"""Stream evaluation through the line's own recipe: what the line would have scored, part by part.

Parts arrive in a seeded shuffled order. While the recipe's pool warms up, every part is admitted as a
warm-up member, exactly as on the line (near-duplicates refused; when the pool first reaches its minimum
size its members are scored among themselves and outliers dropped, and warm-up goes on until it is full
enough again). The line gives warm-up parts no verdict; here they are scored among themselves in the batch
protocol, so every image has a score, or (``late_warmup``, the line protocol) once the pool is ready, against it:
scored among themselves they sit on the warm-up batch's own scale, which ranks a defective warm-up part below
good parts scored later. After warm-up each part is scored against the pool and decided with
the recipe's threshold, then admitted by :meth:`~musc_edge.edge.runtime.recipes.Recipe.admit`: accepted parts
only, never near-duplicates. Used by both 2D (:mod:`.runner`) and 3D (:mod:`.runner3d`) evaluation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import PoolSettings, RecipeSettings, ScanSettings
from ..errors import UsageError
from ..progress import Progress
from ..record import PartRecord, Reason, Verdict
from ..runtime.recipes import Recipe, Scoring, make_recipe
from ..scoring import MuscParams

WarmupScorer = Callable[[list[int]], tuple[np.ndarray, np.ndarray]]
"""Indices of the warm-up parts -> (their maps, their re-scored scores), scored among themselves."""


def eval_recipe(modality: str, capacity: int, min_pool: int, params: MuscParams, grid: tuple[int, int] | None,
                size: int, n_sets: int, patches: int, dim: int, scan: ScanSettings | None = None,
                eviction: str = "fifo", scale: str = "frozen") -> Recipe:
    """The recipe a line with the default recipe settings (threshold, admission, near-duplicate distance)
    and a pool of ``capacity`` (``eviction``, ``scale``) would run; its parts come prepared, so it has no feature
    stage."""
    def no_features(images):
        raise RuntimeError("stream evaluation scores prepared parts; the recipe has no feature stage")

    settings = RecipeSettings(modality=modality, scan=scan if modality != "2d" else None,
                              pool=PoolSettings(capacity=capacity, min_size=min(min_pool, capacity), eviction=eviction,
                                                scale=scale))
    return make_recipe("eval", settings, Scoring(no_features, grid, params, size, {}), n_sets, patches, dim)


@dataclass
class StreamScores:
    maps: np.ndarray          # [N, ...] one map per part
    scores: np.ndarray        # [N] re-scored scores
    warmup: int               # parts scored among themselves while the pool warmed up
    admitted: int             # parts the pool admitted (warm-up included)
    rejected_duplicates: int  # parts refused as near-duplicates of a member
    refs: np.ndarray          # [N] references each part was scored against (members + look-ahead parts)
    warmup_mask: np.ndarray   # [N] parts that arrived while the pool warmed up


def stream_scores(recipe: Recipe, prepared: Sequence[Any], order: np.ndarray, warmup_scores: WarmupScorer,
                  progress: Progress | None = None, look_ahead: int = 0, late_warmup: bool = False) -> StreamScores:
    """Score ``prepared`` parts (what ``recipe.prepare`` makes) in ``order`` through ``recipe``'s pool; with
    ``look_ahead`` each part also has the next ``look_ahead`` parts of the stream as references (the line's
    look-ahead verdicts), which are admitted only after their own verdict."""
    n, pool = len(prepared), recipe.pool
    if n < pool.min_size:
        raise UsageError(f"stream mode needs at least min_pool={pool.min_size} images, the dataset has {n}")
    admitted, step = 0, 0
    warmup: list[int] = []
    while not pool.ready and step < n:
        i = int(order[step])
        part = PartRecord(part_id=str(i), recipe=recipe.name, capture_time=float(step))
        part.decide(Verdict.NO_VERDICT, Reason.WARMUP, "warm-up")
        admitted += recipe.admit(part, prepared[i], now=float(step))
        warmup.append(i)
        step += 1
        progress and progress.advance()
    if not pool.ready:
        raise UsageError(f"the pool holds {pool.size} parts after all {n} (min_size {pool.min_size}): too many "
                         "near-duplicates or outliers to warm up")
    first_maps, first_scores = warmup_scores(warmup)
    maps = np.zeros((n, *first_maps.shape[1:]), np.float32)
    scores = np.zeros(n)
    maps[warmup], scores[warmup] = first_maps, first_scores
    refs = np.full(n, len(warmup) - 1)
    if late_warmup:
        for k, i in enumerate(warmup):
            later = [prepared[int(j)] for j in order[step:step + look_ahead]]
            part, _ = recipe.decide(PartRecord(part_id=str(i), recipe=recipe.name, capture_time=float(k)),
                                    prepared[i], later)
            maps[i], scores[i] = part.anomaly_map, part.score
            refs[i] = pool.size - (str(i) in pool.part_ids) + len(later)
    for step in range(step, n):
        i = int(order[step])
        later = [prepared[int(j)] for j in order[step + 1:step + 1 + look_ahead]]
        refs[i] = pool.size + len(later)
        part, kept = recipe.decide(PartRecord(part_id=str(i), recipe=recipe.name, capture_time=float(step)),
                                   prepared[i], later)
        if part.reason not in (Reason.OK, Reason.ANOMALY):
            raise RuntimeError(f"part {i} could not be scored against a ready pool: {part.reason.label} "
                               f"{part.detail}")
        maps[i], scores[i] = part.anomaly_map, part.score
        admitted += recipe.admit(part, kept, now=float(step))
        progress and progress.advance()
    warmup_mask = np.zeros(n, bool)
    warmup_mask[warmup] = True
    return StreamScores(maps, scores, len(warmup), admitted, recipe.rejected_duplicates, refs, warmup_mask)
