"""MuSc / MuSc-V2 scoring of 2D patch tokens: batch (paper protocol) and one-vs-pool (the line).

Feature sets come from :func:`prepare` (aggregation + L2). The patch score is the mean MSM score over the
feature sets (layers, and degrees for LNAMD); the image score is the max of the map; re-scoring uses the
"anomaly-salient" feature (the feature at the arg-max patch) or the image-level token.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .aggregate import DEFAULT_DEGREES, aggregate, l2_normalise
from .maps import image_scores
from .msm import DEFAULT_FRACTION, PoolTooSmallError, one_vs_pool, score_batch as msm_batch
from .rescore import DEFAULT_WINDOWS, rescore_batch


@dataclass(frozen=True)
class MuscParams:
    """Scoring hyper-parameters (defaults: MuSc-V2's ``configs/muscv2.yaml``)."""

    aggregation: str = "snamd"            # snamd (V2, unit-norm weights) | snamd-raw | lnamd (V1) | none
    degrees: tuple[int, ...] = DEFAULT_DEGREES
    fraction: float = DEFAULT_FRACTION    # interval average over the lowest 30 % of references
    windows: tuple[int, ...] = DEFAULT_WINDOWS
    salient_layer: int = 1                # layer whose arg-max feature drives RsCon (V2: 2nd of 3)
    rescore_feature: str = "salient"      # salient (RsCon, V2) | image_token (RsCIN, V1)
    # Streaming normalisation: a part's raw score is mapped by these quantiles of the pool members' raw
    # scores to 0 and 1 (batch mode uses the batch min and max). Quantiles rather than min/max keep the
    # scale, and so a calibrated threshold, stable when one extreme member enters or leaves the pool.
    pool_quantiles: tuple[float, float] = (0.1, 0.9)
    image_top: int = 1                    # image score: max of the map (1) or mean of its top-k patches

    def salient_set(self, n_sets: int) -> int:
        per_layer = len(self.degrees) if self.aggregation == "lnamd" else 1
        index = self.salient_layer * per_layer + per_layer // 2
        if not 0 <= index < n_sets:
            raise ValueError(f"salient_layer {self.salient_layer} out of range for {n_sets // per_layer} layers")
        return index


def prepare(layer_tokens: list[np.ndarray], grid: tuple[int, int], params: MuscParams) -> list[np.ndarray]:
    """Aggregated unit-norm feature sets ``[N, P, D]`` from per-layer patch tokens ``[N, P, D]``."""
    h, w = grid
    grids = []
    for tokens in layer_tokens:
        n, p, d = tokens.shape
        if p != h * w:
            raise ValueError(f"{p} tokens do not fill a {h}x{w} patch grid")
        grids.append(tokens.reshape(n, h, w, d))
    return aggregate(grids, params.aggregation, params.degrees)


def salient_features(sets: list[np.ndarray], patch_scores: np.ndarray, params: MuscParams,
                     image_tokens: np.ndarray | None = None) -> np.ndarray:
    """``[N, F]`` unit-norm re-scoring features: the salient-set feature at each sample's arg-max patch."""
    if params.rescore_feature == "image_token":
        if image_tokens is None:
            raise ValueError("rescore_feature 'image_token' needs the model's image tokens")
        return l2_normalise(np.asarray(image_tokens, dtype=np.float32))
    chosen = sets[params.salient_set(len(sets))]
    top = patch_scores.reshape(patch_scores.shape[0], -1).argmax(axis=1)
    return l2_normalise(chosen[np.arange(chosen.shape[0]), top])


@dataclass
class BatchScores:
    patch_maps: np.ndarray   # [N, h, w] fused patch scores
    raw: np.ndarray          # [N] max of each map
    rescored: np.ndarray     # [N] after RsCon / RsCIN
    features: np.ndarray     # [N, F] re-scoring features


def score_batch(sets: list[np.ndarray], grid: tuple[int, int], params: MuscParams = MuscParams(),
                image_tokens: np.ndarray | None = None, on_set_done: Callable[[], None] | None = None) -> BatchScores:
    """Every sample scored against all others (the papers' transductive protocol). ``on_set_done`` is called
    after each feature set is scored (a progress display)."""
    n = sets[0].shape[0]
    if n < 2:
        raise PoolTooSmallError(f"batch scoring needs at least 2 samples, got {n}")
    per_set = []
    for fs in sets:
        per_set.append(msm_batch(fs, params.fraction))
        if on_set_done is not None:
            on_set_done()
    patch = np.mean(per_set, axis=0)
    maps = patch.reshape(n, *grid)
    raw = image_scores(maps, params.image_top)
    feats = salient_features(sets, patch, params, image_tokens)
    return BatchScores(maps, raw, rescore_batch(raw, feats, params.windows), feats)


def score_one(query_sets: list[np.ndarray], pool_sets: list[np.ndarray], grid: tuple[int, int],
              params: MuscParams = MuscParams(), image_token: np.ndarray | None = None,
              workspaces: list[np.ndarray] | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """One sample against a pool. ``query_sets[s]`` is ``[P, D]``; ``pool_sets[s]`` is ``[K, P, D]`` (or flat).

    Returns (patch map ``[h, w]``, raw image score, re-scoring feature ``[F]``).
    """
    patch = one_vs_pool(query_sets, pool_sets, params.fraction, workspaces=workspaces).patch
    batch_sets = [q[None] for q in query_sets]
    tokens = None if image_token is None else np.asarray(image_token)[None]
    feature = salient_features(batch_sets, patch[None], params, tokens)[0]
    return patch.reshape(grid), float(image_scores(patch[None], params.image_top)[0]), feature
