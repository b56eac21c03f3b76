"""Shadow evaluation of a candidate threshold on parts the line has already decided.

Every scored ledger row holds the score the line compared with its threshold, so a candidate threshold
can be replayed exactly without re-running the model: the report lists the parts whose verdict would
flip. Nothing is changed; applying is a separate command.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musc_edge.edge.ledger import LedgerRow
from musc_edge.edge.record import Reason, Verdict

SCORED = (Reason.OK, Reason.ANOMALY)


def verdict_changes(scores: np.ndarray, rejected: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the parts a candidate threshold would newly reject / newly accept.

    ``scores`` and ``rejected`` (the verdicts given) are per part; ``candidate`` is a threshold per part (or
    one for all). A part is rejected when its score is at or above the threshold.
    """
    would_reject = np.asarray(scores, np.float64) >= np.asarray(candidate, np.float64)
    rejected = np.asarray(rejected, bool)
    return would_reject & ~rejected, ~would_reject & rejected


@dataclass(frozen=True)
class Flip:
    """A part whose verdict the candidate would change."""

    seq: int
    part_id: str
    recipe: str
    score: float
    old_threshold: float
    new_threshold: float
    source_ref: str | None


@dataclass(frozen=True)
class ShadowReport:
    rows: int                 # ledger rows looked at
    scored: int               # of those, parts with a score (warm-up, errors and test parts have none)
    rejected_now: int         # scored parts the line rejected
    rejected_candidate: int   # scored parts the candidate would reject
    newly_rejected: list[Flip]
    newly_accepted: list[Flip]

    @property
    def changed(self) -> int:
        return len(self.newly_rejected) + len(self.newly_accepted)


def shadow_thresholds(rows: Sequence[LedgerRow], candidate: dict[str, float],
                      baseline: dict[str, float] | None = None) -> ShadowReport:
    """Replay ``candidate`` thresholds (per recipe; recipes not named keep the threshold each part had)
    over ledger ``rows`` and report the verdicts that would change. ``baseline``: the thresholds to compare
    against per recipe (the one in force or staged now, which may differ from the one a row was decided
    with); recipes not named compare against the verdict each row got."""
    baseline = baseline or {}
    scored = [r for r in rows if r.reason in SCORED and r.score is not None and not r.test_part]
    scores = np.array([r.score for r in scored], np.float64)
    old = np.array([baseline.get(r.recipe, r.threshold) for r in scored], np.float64)
    new = np.array([candidate.get(r.recipe, r.threshold) for r in scored], np.float64)
    rejected = np.array([r.score >= baseline[r.recipe] if r.recipe in baseline else r.verdict == Verdict.REJECT
                         for r in scored], bool)
    to_reject, to_accept = verdict_changes(scores, rejected, new)

    def flips(mask: np.ndarray) -> list[Flip]:
        return [Flip(scored[i].seq, scored[i].part_id, scored[i].recipe, float(scores[i]), float(old[i]),
                     float(new[i]), scored[i].source_ref) for i in np.flatnonzero(mask)]

    return ShadowReport(rows=len(rows), scored=len(scored), rejected_now=int(rejected.sum()),
                        rejected_candidate=int(np.count_nonzero(scores >= new)),
                        newly_rejected=flips(to_reject), newly_accepted=flips(to_accept))
