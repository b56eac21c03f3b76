"""What every pool and recipe shares: a part's scoring inputs and its one score against a pool.

:class:`Prepared` (an image's 2D feature sets) and :class:`PreparedScan` (a scan's 2D sets and 3D sample) are
what a recipe prepares and a pool admits; :class:`PoolScore` is what every pool's ``score`` returns
(:class:`musc_edge.edge.pool.FeaturePool`, :class:`musc_edge.edge.scan_pool.ScanPool`) and every recipe
passes on to the verdict, for 2D, 3D and 2D+3D alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scoring3d import Sample3D


@dataclass
class Prepared:
    """An image part's scoring inputs: aggregated feature sets (``[P, D]`` each)."""

    sets: list[np.ndarray]
    feature: np.ndarray | None = None    # re-scoring feature, once scored
    nearest: float | None = None         # distance to the closest pool member, once scored
    image_token: np.ndarray | None = None  # the model's image token, for image_token re-scoring (evaluation)


@dataclass
class PreparedScan:
    """A scanned part's scoring inputs."""

    sets: list[np.ndarray]             # 2D feature sets [P, D] (empty for a 3d recipe)
    sample: Sample3D
    feature: np.ndarray | None = None  # re-scoring feature, once scored
    nearest: float | None = None       # distance to the closest member (scan scoring does not measure it)


@dataclass
class PoolScore:
    """One part scored against its pool."""

    map: np.ndarray               # 2D: [h, w] patch map (a recipe maps it to the frame); scans: [size, size] map
    raw: float                    # max of the map
    score: float                  # after streaming RsCon (the value compared with the threshold)
    feature: np.ndarray           # [F] re-scoring feature
    n_refs: int                   # members scored against, plus look-ahead parts
    nearest: float | None = None  # mean nearest-patch distance to the closest member when scoring measured it
                                  # (~0: the same part again)
