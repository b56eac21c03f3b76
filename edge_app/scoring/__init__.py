"""MuSc / MuSc-V2 numerics in pure numpy: no I/O, no framework; testable, benchmarkable, portable.

The one exception is :mod:`.onnx_msm` (not imported here): one-vs-pool MSM as an ONNX graph, which holds an
ONNX Runtime session; numpy (:mod:`.msm`) is the reference it is tested against.
"""
from .aggregate import aggregate, l2_normalise, lnamd, snamd
from .maps import image_scores, upsample
from .msm import OneVsPool, PoolTooSmallError, interval_k, interval_mean, one_vs_pool, patch_to_sample_distances
from .musc import BatchScores, MuscParams, prepare, salient_features, score_batch, score_one
from .rescore import rescore_batch, rescore_one

__all__ = [
    "BatchScores", "MuscParams", "OneVsPool", "PoolTooSmallError", "aggregate", "image_scores", "interval_k",
    "interval_mean", "l2_normalise", "lnamd", "one_vs_pool", "patch_to_sample_distances", "prepare", "rescore_batch",
    "rescore_one", "salient_features", "score_batch", "score_one", "snamd", "upsample",
]
