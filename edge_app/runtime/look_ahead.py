"""Look-ahead verdicts: a part waits for a few later parts and is scored against them too.

The reject gate sits downstream of the camera, so a part's verdict is not needed until shortly before its
deadline. Scoring it also against the parts that arrive after it (references only: a later part enters the
pool only after its own verdict) brings the line closer to the papers' batch protocol, where every image is a
reference of every other. A part waits until ``look_ahead.parts`` later parts of its recipe are extracted, or
``look_ahead.max_ms`` after its capture, or until its deadline minus the measured scoring time and a margin,
whichever comes first; a line that is ending decides every waiting part at once.

Pure bookkeeping on monotonic times, no threads: the line's worker owns one :class:`LookAheadWindow`.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..config import LookAheadSettings
from ..record import PartRecord

# Scoring times kept for the estimate a part's wait leaves room for (their maximum: a slow part must not be late).
SCORING_SAMPLES = 32


@dataclass
class Waiting:
    """A part extracted and waiting for its verdict."""

    part: PartRecord
    extracted: object | None        # what the recipe prepared; None when the part cannot be scored
    decide_by: float                # monotonic time at which it is scored with what is there
    waiting_since: float | None = None   # when the worker first found it oldest and not yet due


class LookAheadWindow:
    """Extracted parts in arrival order; the oldest is decided when it is due (:meth:`due`)."""

    def __init__(self, settings_for: Callable[[str], LookAheadSettings], initial_scoring_s: float = 0.1):
        self._settings_for = settings_for
        self._parts: deque[Waiting] = deque()
        self._scoring: deque[float] = deque([initial_scoring_s], maxlen=SCORING_SAMPLES)

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def scoring_estimate_s(self) -> float:
        """The slowest of the recent scoring times: what a waiting part keeps free before its deadline."""
        return max(self._scoring)

    def record_scoring(self, seconds: float) -> None:
        """A part's measured scoring time (feeds :attr:`scoring_estimate_s`)."""
        if seconds > 0:
            self._scoring.append(seconds)

    def add(self, part: PartRecord, extracted: object | None) -> None:
        """A newly extracted part joins the end of the window."""
        settings = self._settings_for(part.recipe)
        latest = part.deadline - self.scoring_estimate_s - settings.margin_ms / 1e3
        waited = (part.capture_monotonic or 0.0) + settings.max_ms / 1e3
        decide_by = min(latest, waited) if settings.parts > 0 and extracted is not None else float("-inf")
        self._parts.append(Waiting(part, extracted, decide_by))

    def references(self, head: Waiting) -> list[Waiting]:
        """The later parts ``head`` (the oldest, waiting or just taken by :meth:`due`) may be scored against:
        same recipe, extracted, not yet decided, another part id (a part seen twice must not mask itself), at
        most ``look_ahead.parts``."""
        limit = self._settings_for(head.part.recipe).parts
        refs = [w for w in self._parts
                if w is not head and w.part.recipe == head.part.recipe and w.extracted is not None and w.part.verdict is None
                and w.part.part_id != head.part.part_id]
        return refs[:limit]

    def due(self, now: float, ending: bool = False) -> Waiting | None:
        """Remove and return the oldest part if it must be decided now: its look-ahead is complete, its
        time is up, or the line is ending; else None."""
        if not self._parts:
            return None
        head = self._parts[0]
        limit = self._settings_for(head.part.recipe).parts
        if ending or now >= head.decide_by or len(self.references(head)) >= limit:
            # what the part waited by choice, not behind other parts: the latency a shorter deadline would save
            head.part.times.wait = now - head.waiting_since if head.waiting_since is not None else 0.0
            return self._parts.popleft()
        if head.waiting_since is None:
            head.waiting_since = now
        return None

    def wait_s(self, now: float, idle_s: float) -> float:
        """How long the worker may block for the next part before the oldest waiting part falls due."""
        if not self._parts:
            return idle_s
        return max(0.0, min(idle_s, self._parts[0].decide_by - now))

    def drain(self) -> list[Waiting]:
        """Every waiting part, oldest first (the worker stopped: each still needs its row)."""
        parts = list(self._parts)
        self._parts.clear()
        return parts
