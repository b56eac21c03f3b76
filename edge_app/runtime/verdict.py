"""From a pool score to a part's verdict: the rule every recipe (2D, 3D, 2D+3D) shares."""
from __future__ import annotations

import logging
import time
from typing import Callable

from ..record import PartRecord, Reason, Verdict
from ..scoring import PoolTooSmallError

log = logging.getLogger(__name__)


def verdict_from_pool(part: PartRecord, prepared, threshold: float, score: Callable[[], object]):
    """Time ``score()`` (one-vs-pool scoring of ``prepared``) and turn its result into the part's verdict:
    WARMUP while the pool is too small, ENGINE_ERROR if scoring raises, else REJECT at or above
    ``threshold``. Returns (part, prepared or None, the score result or None)."""
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
    if result.score >= threshold:
        return part.decide(Verdict.REJECT, Reason.ANOMALY), prepared, result
    return part.decide(Verdict.ACCEPT, Reason.OK), prepared, result
