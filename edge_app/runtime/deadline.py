"""When a part's verdict must reach the PLC: the calibrated reject timing, else ``line.deadline_ms``.

Time mode: a fixed capture-to-ejector delay. Encoder mode: encoder counts from the camera to the ejector,
over the conveyor speed measured from recent parts' encoder stamps (an exponential moving average, so one
odd stamp does not move every deadline). Both give the verdict ``actuator_lead_ms`` less, for the ejector.
"""
from __future__ import annotations

from .calibration_state import MAX_REJECT_DELAY_MS, RejectTiming


class DeadlineClock:
    """Deadlines of parts in arrival order (encoder mode learns the conveyor speed from them)."""

    def __init__(self, default_s: float, timing: RejectTiming | None = None, smoothing: float = 0.2):
        self.default_s, self.timing, self.smoothing = default_s, timing, smoothing
        self._last: tuple[int, float] | None = None   # (encoder, monotonic) of the last stamped part
        self.counts_per_s: float | None = None

    def deadline(self, capture_monotonic: float, encoder: int | None = None) -> float:
        """Monotonic time by which the verdict of a part captured at ``capture_monotonic`` must be signalled."""
        timing = self.timing
        if timing is None:
            return capture_monotonic + self.default_s
        lead = timing.actuator_lead_ms / 1e3
        if timing.mode == "time":
            return capture_monotonic + timing.delay_ms / 1e3 - lead
        if encoder is not None:
            self._measure(encoder, capture_monotonic)
        if self.counts_per_s is None:  # no speed yet (first part, or a stopped belt): the line's budget
            return capture_monotonic + self.default_s
        # a belt crawling to a stop would push the deadline out without bound: never beyond the longest delay
        return capture_monotonic + min(timing.counts / self.counts_per_s, MAX_REJECT_DELAY_MS / 1e3) - lead

    def _measure(self, encoder: int, now: float) -> None:
        if self._last is not None and now > self._last[1]:
            rate = (encoder - self._last[0]) / (now - self._last[1])
            if rate > 0:
                self.counts_per_s = rate if self.counts_per_s is None else \
                    (1 - self.smoothing) * self.counts_per_s + self.smoothing * rate
        self._last = (encoder, now)
