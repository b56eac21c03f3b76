"""Pure helpers behind the view's figures: the current shift, the score histogram. No I/O."""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import numpy as np


def shift_start(now: datetime, starts: Sequence[str]) -> datetime:
    """The start of the shift ``now`` falls in: the latest ``HH:MM`` start at or before ``now``.

    ``now`` should be timezone-aware local time; the result carries the same tzinfo.
    """
    candidates = []
    for text in starts:
        hour, minute = (int(x) for x in text.split(":"))
        today = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        candidates.append(today if today <= now else today - timedelta(days=1))
    return max(candidates)


def score_histogram(scores: np.ndarray, rejected: np.ndarray, threshold: float | None, bins: int = 30) -> dict:
    """Counts of ``scores`` in ``bins`` equal bins, split into accepted and rejected parts.

    The range covers every score and the threshold, so the threshold line always lies on the chart.
    Returns {lo, hi, accepted: [bins], rejected: [bins], n, threshold}.
    """
    scores = np.asarray(scores, dtype=np.float64)
    rejected = np.asarray(rejected, dtype=bool)
    if scores.size == 0:
        return {"lo": None, "hi": None, "accepted": [], "rejected": [], "n": 0, "threshold": threshold}
    lo, hi = float(scores.min()), float(scores.max())
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, bins + 1)
    return {"lo": lo, "hi": hi, "n": int(scores.size), "threshold": threshold,
            "accepted": np.histogram(scores[~rejected], edges)[0].tolist(),
            "rejected": np.histogram(scores[rejected], edges)[0].tolist()}
