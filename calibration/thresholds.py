"""Label-free threshold calibration: pick the score threshold for a target false-reject rate on good parts.

The scores come from an *unlabeled* stream (the pool's leave-one-out scores, or the last N ledger parts),
so some of them may be defective parts. The default method therefore fits the good-part distribution
only from its lower half, where defects (which score high) do not reach, and extrapolates to the target
quantile with a Gumbel model (image scores are maxima over patches; their upper tail is heavier than a
normal one). The share of parts above the fitted model is estimated at the same time and the fit's
quantile ranks are corrected for it, so a stream with ~20 % defects still calibrates.

Pure numpy, no I/O. See docs/calibration.md for the derivation and the bench (bench/bench_calibration.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

METHODS = ("gumbel", "mad", "empirical")
MIN_SCORES = 20          # fewer scores than this give no usable tail estimate
OUTLIER_LEVEL = 1e-3     # a good part scores above the model's (1 - OUTLIER_LEVEL) quantile this rarely
MAX_OUTLIER_FRACTION = 0.5
_START_LEVELS = (0.10, 0.25)  # mixture quantiles of the first Gumbel fit (defects reach them last)
_FIT_LEVELS = (0.25, 0.50)    # quantiles of the good parts the refined fit uses
_MAD_TO_SIGMA = 1.4826


class ThresholdError(ValueError):
    """The scores cannot give a trustworthy threshold; the message says why."""


def _gumbel_quantile(p: float | np.ndarray) -> float | np.ndarray:
    """Quantile of the standard Gumbel (max) distribution."""
    return -np.log(-np.log(p))


@dataclass(frozen=True)
class ThresholdFit:
    """A fitted good-part score model and the threshold it gives for ``target_frr``."""

    method: str
    target_frr: float
    threshold: float
    n: int                    # scores the fit used
    location: float           # model location (gumbel: mu, mad: median)
    scale: float              # model scale (gumbel: beta, mad: sigma); 0 for empirical
    outlier_fraction: float   # estimated share of the scores above the good-part model (possible defects)
    sorted_scores: np.ndarray  # the scores, ascending (empirical tail)

    def false_reject_rate(self, threshold: float) -> float:
        """Modelled share of good parts scoring at or above ``threshold``."""
        if self.method == "gumbel":
            return float(-np.expm1(-np.exp(-(threshold - self.location) / self.scale)))
        if self.method == "mad":
            return 1.0 - NormalDist(self.location, self.scale).cdf(threshold)
        return reject_rate(self.sorted_scores, threshold)


def reject_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of ``scores`` at or above ``threshold`` (what the line would reject); ``scores`` ascending or not."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.count_nonzero(scores >= threshold)) / scores.size if scores.size else 0.0


def _check(scores: np.ndarray, target_frr: float, method: str) -> np.ndarray:
    if method not in METHODS:
        raise ThresholdError(f"unknown threshold method {method!r}: expected one of {METHODS}")
    if isinstance(target_frr, bool) or not isinstance(target_frr, (int, float, np.floating)) \
            or not 0.0 < target_frr < 1.0:
        raise ThresholdError(f"target false-reject rate must be in (0, 1), e.g. 0.01 for 1 %; got {target_frr!r}")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    scores = scores[np.isfinite(scores)]
    if scores.size < MIN_SCORES:
        raise ThresholdError(f"{scores.size} scores are too few to calibrate from; at least {MIN_SCORES} are "
                             "needed (let the pool fill, or use more ledger parts)")
    return np.sort(scores)


def _quantile_sorted(x: np.ndarray, p: float) -> float:
    """``np.quantile(x, p)`` (linear) of an ascending array, without sorting it again."""
    position = p * (x.size - 1)
    below = int(position)
    above = min(below + 1, x.size - 1)
    return float(x[below] + (position - below) * (x[above] - x[below]))


def _fit_gumbel(x: np.ndarray, iterations: int = 50) -> tuple[float, float, float]:
    """(mu, beta, outlier fraction) of the good parts among the ascending scores ``x``.

    Gumbel location and scale from two quantiles of the good parts. The first fit reads the mixture's 10 %
    and 25 % points, which defects (high scores) cannot reach unless they are most of the stream; then
    ``eps``, the share of scores above the model's 99.9 % point, is estimated and the good parts' quartile
    and median are read at ranks scaled by ``1 - eps``, iterated to a fixed point.
    """
    g_cut = _gumbel_quantile(1.0 - OUTLIER_LEVEL)
    levels, eps = _START_LEVELS, 0.0
    for _ in range(iterations):
        a, b = _quantile_sorted(x, levels[0]), _quantile_sorted(x, levels[1])
        beta = (b - a) / float(_gumbel_quantile(levels[1] / (1.0 - eps)) - _gumbel_quantile(levels[0] / (1.0 - eps)))
        if not beta > 0:
            raise ThresholdError(f"the scores have no spread in their lower half ({a:.6g} at the "
                                 f"{100 * levels[0]:.0f} % point, {b:.6g} at {100 * levels[1]:.0f} %); "
                                 "cannot model the good parts")
        mu = b - beta * float(_gumbel_quantile(levels[1] / (1.0 - eps)))
        above = x.size - np.searchsorted(x, mu + beta * g_cut, side="right")
        new = max(0.0, above / x.size - OUTLIER_LEVEL)
        converged = abs(new - eps) < 0.5 / x.size and levels is not _START_LEVELS
        eps = new
        if converged or eps >= MAX_OUTLIER_FRACTION:
            break
        levels = (_FIT_LEVELS[0] * (1.0 - eps), _FIT_LEVELS[1] * (1.0 - eps))
    return float(mu), float(beta), float(eps)


def fit_threshold(scores: np.ndarray, target_frr: float, method: str = "gumbel") -> ThresholdFit:
    """The threshold at which ``target_frr`` of good parts would be rejected, from unlabeled ``scores``.

    Methods: ``gumbel`` (default; contamination-corrected lower-half fit, Gumbel tail), ``mad`` (median +
    z * 1.4826 MAD, normal tail: too light a tail for image scores, kept for comparison), ``empirical``
    (raw quantile: only right for a stream known to be all good).
    """
    x = _check(scores, target_frr, method)
    if method == "gumbel":
        mu, beta, eps = _fit_gumbel(x)
        if eps >= MAX_OUTLIER_FRACTION:
            raise ThresholdError(f"{100 * eps:.0f} % of the scores lie above the good-part model: the stream is "
                                 "not mostly good parts, so no label-free threshold can be trusted")
        threshold = mu + beta * float(_gumbel_quantile(1.0 - target_frr))
        return ThresholdFit(method, target_frr, float(threshold), x.size, mu, beta, eps, x)
    if method == "mad":
        median = float(np.median(x))
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(x - median)))
        if not sigma > 0:
            raise ThresholdError(f"the scores have no spread (MAD = 0 around {median:.6g})")
        normal = NormalDist(median, sigma)
        eps = max(0.0, reject_rate(x, normal.inv_cdf(1.0 - OUTLIER_LEVEL)) - OUTLIER_LEVEL)
        return ThresholdFit(method, target_frr, normal.inv_cdf(1.0 - target_frr), x.size, median, sigma, eps, x)
    threshold = float(np.quantile(x, 1.0 - target_frr))
    return ThresholdFit(method, target_frr, threshold, x.size, float(np.median(x)), 0.0, 0.0, x)


@dataclass(frozen=True)
class Refinement:
    """A threshold moved (or not) to agree with parts the technician confirmed."""

    threshold: float
    changed: bool
    explanation: str


def refine_with_labels(threshold: float, good: dict[str, float], bad: dict[str, float],
                       margin: float) -> Refinement:
    """Move ``threshold`` so every confirmed good part is accepted (score below it) and every confirmed
    bad part rejected (score at or above it), by ``margin`` where there is room; unchanged if it already
    agrees. ``good`` / ``bad`` map part ids to their scores. ThresholdError when no threshold separates them.
    """
    if not margin > 0:
        raise ThresholdError(f"refinement margin must be > 0, got {margin!r}")
    worst_good = max(good.items(), key=lambda item: item[1]) if good else None
    worst_bad = min(bad.items(), key=lambda item: item[1]) if bad else None
    if worst_good and worst_bad and worst_good[1] >= worst_bad[1]:
        raise ThresholdError(f"confirmed good part {worst_good[0]} scores {worst_good[1]:.4f}, at or above "
                             f"confirmed bad part {worst_bad[0]} ({worst_bad[1]:.4f}): no threshold separates "
                             "them; check the labels")
    room = (worst_bad[1] - worst_good[1]) / 2 if worst_good and worst_bad else math.inf
    step = min(margin, room)
    if worst_good and threshold <= worst_good[1]:
        new = worst_good[1] + step
        return Refinement(new, True, f"raised from {threshold:.4f} to {new:.4f} so confirmed good part "
                                     f"{worst_good[0]} (score {worst_good[1]:.4f}) is accepted")
    if worst_bad and threshold > worst_bad[1]:
        new = worst_bad[1] - step
        return Refinement(new, True, f"lowered from {threshold:.4f} to {new:.4f} so confirmed bad part "
                                     f"{worst_bad[0]} (score {worst_bad[1]:.4f}) is rejected")
    return Refinement(threshold, False, f"{threshold:.4f} already accepts the {len(good)} confirmed good and "
                                        f"rejects the {len(bad)} confirmed bad part(s)")
