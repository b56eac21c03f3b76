"""CAE: cross-modal anomaly enhancement of the 2D and 3D distance matrices (MuSc-V2, ``_MSM.py``).

Works per query sample and layer on ``D2 [P, K]`` (patch-to-reference-sample distances) and ``D3 [G, K]``
(group-to-reference-sample distances), before the interval average. The organised cloud is pixel-aligned
with the RGB (both resized to the same grid and indexed by the same pixels), so a group belongs to the 2D
patch containing its centre pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_array


@dataclass(frozen=True)
class Projection:
    """Cross-modal projection lists of one sample."""

    patch_of_group: np.ndarray   # [G] patch index P(g) holding each group's centre pixel
    patch_mean: csr_array        # [P, G] row p averages the groups G(p) whose centres lie in patch p
    covered: np.ndarray          # [P] bool, patches with at least one centre


def projection(centre_pixels: np.ndarray, size: int, grid: tuple[int, int]) -> Projection:
    """Projection lists from centre pixel ids (raster, ``size x size``) to an ``h x w`` patch grid."""
    h, w = grid
    if size % h or size % w:
        raise ValueError(f"image size {size} is not a whole number of {h}x{w} patches")
    rows, cols = np.divmod(np.asarray(centre_pixels, dtype=np.int64), size)
    if rows.size and (rows.min() < 0 or rows.max() >= size):
        raise ValueError(f"centre pixel ids fall outside the {size}x{size} grid")
    patch = (rows // (size // h)) * w + cols // (size // w)
    counts = np.bincount(patch, minlength=h * w)
    weights = 1.0 / counts[patch]
    mean = csr_array((weights, (patch, np.arange(patch.size))), shape=(h * w, patch.size))
    return Projection(patch, mean, counts > 0)


def histogram_match(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """H(source -> target): each entry of ``target`` replaced by the ``source`` value of the same rank.

    A quantile transfer of ``target`` onto the value distribution of ``source`` (same number of entries;
    the result has ``target``'s shape).
    """
    if source.size != target.size:
        raise ValueError(f"histogram matching needs equal sizes, got {source.size} and {target.size}")
    out = np.empty(target.size, dtype=np.result_type(source, np.float32))
    out[np.argsort(target, axis=None, kind="stable")] = np.sort(source, axis=None)
    return out.reshape(target.shape)


def _row_spread(d: np.ndarray) -> np.ndarray:
    return d.std(axis=1, ddof=1 if d.shape[1] > 1 else 0)


def cae(d2: np.ndarray, d3: np.ndarray, proj: Projection) -> tuple[np.ndarray, np.ndarray]:
    """Enhanced ``(D2', D3')``: each modality's distances blended with the other's, value-matched.

    Cross matrices ``C2[p] = mean_{g in G(p)} D3[g]`` (0 where no centre) and ``C3[g] = D2[P(g)]``;
    confidences ``1 - H(std D -> std C)``; ``C`` rescaled onto ``D``'s values; ``E = conf * max(D, C)``
    re-mapped onto ``D``'s values; ``D' = (D + E) / 2``.
    """
    _check_pair(d2, d3, proj)
    return _enhance_2d(d2, d3, proj), _enhance_3d(d2, d3, proj)


def enhance_3d(d2: np.ndarray, d3: np.ndarray, proj: Projection) -> np.ndarray:
    """``D3'`` of :func:`cae` alone (half the work), for a 3D side scored a second way."""
    _check_pair(d2, d3, proj)
    return _enhance_3d(d2, d3, proj)


def _check_pair(d2: np.ndarray, d3: np.ndarray, proj: Projection) -> None:
    if d2.shape[1] != d3.shape[1]:
        raise ValueError(f"2D and 3D distances use different pools: {d2.shape[1]} vs {d3.shape[1]} samples")
    if proj.patch_mean.shape != (d2.shape[0], d3.shape[0]):
        raise ValueError(f"projection is {proj.patch_mean.shape} but distances are {d2.shape[0]} patches x "
                         f"{d3.shape[0]} groups")


def _enhance_2d(d2: np.ndarray, d3: np.ndarray, proj: Projection) -> np.ndarray:
    c2 = proj.patch_mean @ d3
    conf2 = 1.0 - histogram_match(_row_spread(d2), _row_spread(c2))
    covered = proj.covered
    c2[covered] = histogram_match(d2[covered], c2[covered])
    e2 = histogram_match(d2, conf2[:, None] * np.maximum(d2, c2))
    return (d2 + e2) * 0.5


def _enhance_3d(d2: np.ndarray, d3: np.ndarray, proj: Projection) -> np.ndarray:
    c3 = d2[proj.patch_of_group]
    conf3 = 1.0 - histogram_match(_row_spread(d3), _row_spread(c3))
    c3 = histogram_match(d3, c3)
    e3 = histogram_match(d3, conf3[:, None] * np.maximum(d3, c3))
    return (d3 + e3) * 0.5
