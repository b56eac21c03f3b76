"""From a pool score to a part's verdict: the rule every recipe (2D, 3D, 2D+3D) shares."""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

from ..record import MAX_THRESHOLD, PartRecord, Reason, Verdict
from ..scoring import PoolTooSmallError

log = logging.getLogger(__name__)


def threshold_problem(threshold: object) -> str | None:
    """Why ``threshold`` must not decide verdicts (not a number, not finite, <= 0, > MAX_THRESHOLD), or None."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        return f"threshold {threshold!r} is not a number"
    if not math.isfinite(threshold):
        return f"threshold {threshold!r} is not finite"
    if not 0 < threshold <= MAX_THRESHOLD:
        return f"threshold {threshold!r} is outside (0, {MAX_THRESHOLD:g}]"
    return None


def verdict_from_pool(part: PartRecord, prepared, threshold: float, score: Callable[[], object]):
    """Time ``score()`` (one-vs-pool scoring of ``prepared``) and turn its result into the part's verdict:
    WARMUP while the pool is too small, ENGINE_ERROR if scoring raises, else REJECT at or above
    ``threshold``; a score or threshold that is not a finite number gives NO_VERDICT (engine_error), never
    a verdict, and the part is not admitted (prepared None). Returns (part, prepared or None, the score result or None)."""
    t0 = time.monotonic()
    try:
        result = score()
    except PoolTooSmallError as exc:
        part.times.scoring = time.monotonic() - t0
        return part.decide(Verdict.NO_VERDICT, Reason.WARMUP, str(exc)), prepared, None
    except Exception as exc:  # the scorer must never take the line down with it
        log.exception("scoring failed on part %s", part.part_id)
        part.times.scoring = time.monotonic() - t0
        return part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"{type(exc).__name__}: {exc}"), None, None
    part.times.scoring = time.monotonic() - t0
    part.raw_score, part.score, part.threshold = result.raw, result.score, threshold
    prepared.feature = result.feature
    unusable = threshold_problem(threshold) or _score_problem(result.score)
    if unusable is not None:  # NaN >= t is False: a non-finite number would silently ACCEPT
        log.error("part %s not decided: %s", part.part_id, unusable)
        return part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, unusable), None, None
    if result.score >= threshold:
        return part.decide(Verdict.REJECT, Reason.ANOMALY), prepared, result
    return part.decide(Verdict.ACCEPT, Reason.OK), prepared, result


def _score_problem(score: object) -> str | None:
    try:
        value = float(score)
    except (TypeError, ValueError):
        return f"score {score!r} is not a number"
    return None if math.isfinite(value) else f"score {value!r} is not finite"
