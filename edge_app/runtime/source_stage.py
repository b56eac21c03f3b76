"""The source stage, on the line's source thread: parts from the frame source at the line's pace, each checked,
stamped with its deadline and queued for the engine; when the engine queue is full the part gets NO_VERDICT
(overload) on the spot and goes straight to the output stage. Nothing is dropped: every part reaches the output
stage exactly once. A frame the source fails on is that trigger's NO_VERDICT row; a source that fails is
alarmed and reopened; one that cannot be read for ``give_up_s`` stops the line."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from ..config import LineConfig
from ..record import PartRecord, Reason, Verdict
from ..sources.base import FrameSource, SourceConfigError, SourceError
from ..sources.fields import check_part_fields
from .deadline import DeadlineClock
from .faults import one_line
from .messages import END, End
from .output import OutputStage

log = logging.getLogger(__name__)
SOURCE_RETRY_S = (0.2, 5.0)   # a failed source is reopened after 0.2 s, doubling up to 5 s
FRAME_FAULTS_BEFORE_REOPEN = 20   # faults in a row, no part between them: the source is reopened


class SourceStage:
    """Reads ``source`` into ``engine_queue`` (PartRecord, then END) until ``stopping`` or its end."""

    def __init__(self, config: LineConfig, source: FrameSource, clock: DeadlineClock, *,
                 engine_queue: queue.Queue[PartRecord | End], output: OutputStage, stopping: threading.Event,
                 on_alarm: Callable[[str], None], fatal_fault: Callable[[str], None],
                 finished: Callable[[str], None], give_up_s: float):
        self.config, self.source, self.clock, self.output = config, source, clock, output
        self._queue, self._stopping, self._on_alarm, self._fatal_fault = engine_queue, stopping, on_alarm, fatal_fault
        self._finished, self.give_up_s = finished, give_up_s
        self._recipe = config.source.recipe
        self.taken = self._faults = 0

    def run(self) -> None:
        """Parts from the source until ``stopping`` or the end of a finite source. A fault while a frame is read
        gives that trigger a NO_VERDICT row and the source is read on; a source that fails (or ends by itself)
        is alarmed and reopened. A source that cannot be read for ``give_up_s``, whose config is wrong, or a
        finite one that fails (reopening would replay it) stops the line (``fatal_fault``)."""
        failing_since: float | None = None
        faults_in_a_row, retry = 0, SOURCE_RETRY_S[0]
        try:
            while not self._stopping.is_set():
                opened = None
                try:
                    self.source.open()
                    opened = time.monotonic()
                    for part in self.source.parts():
                        failing_since, faults_in_a_row, retry = None, 0, SOURCE_RETRY_S[0]
                        self.take(part)
                        if self._stopping.is_set():
                            break
                    if self._stopping.is_set():
                        return
                    if self.source.finite:
                        ended = f"{self.source.describe()} finished after {self.taken} parts"
                        self._finished(ended)
                        log.warning("%s: the line stops%s", ended, " (set source.loop: true to replay forever)"
                                    if self.config.source.type == "replay" else "")
                        return
                    raise SourceError(f"{self.source.describe()} ended by itself")
                except Exception as exc:
                    if self._stopping.is_set():
                        return
                    device = isinstance(exc, SourceError) or opened is None   # opening it concerns no frame
                    if not device:   # a fault while reading one frame: that trigger's row, then read on
                        log.exception("frame source fault")
                        faults_in_a_row += 1
                        self._fault_part(exc)
                    if isinstance(exc, SourceConfigError) or self.source.finite:
                        self._fatal_fault(f"frame source {self.source.describe()} failed: {one_line(exc)}")
                        return
                    if device or faults_in_a_row >= FRAME_FAULTS_BEFORE_REOPEN:
                        now = time.monotonic()
                        if opened is not None and now - opened >= SOURCE_RETRY_S[1]:   # it ran a while: a new streak
                            failing_since, retry = None, SOURCE_RETRY_S[0]
                        failing_since = failing_since or now
                        if now - failing_since >= self.give_up_s:
                            self._fatal_fault(f"frame source {self.source.describe()} could not be read for "
                                              f"{now - failing_since:.0f} s: {one_line(exc)}")
                            return
                        if retry == SOURCE_RETRY_S[0]:   # the first failure of a streak; the rest are logged
                            self._on_alarm(f"frame source failed, reopening: {one_line(exc)}")
                        else:
                            log.info("frame source still failing: %s", one_line(exc))
                        self.close()
                        self._stopping.wait(retry)
                        retry, faults_in_a_row = min(2 * retry, SOURCE_RETRY_S[1]), 0
        finally:
            self.close()
            self._queue.put(END)

    def take(self, part: PartRecord) -> None:
        """Stamp a part from the source and queue it for the engine (NO_VERDICT overload when the queue is
        full, or when it cannot be stamped: either way it goes straight to the output stage)."""
        try:
            check_part_fields(part, default_recipe=self._recipe)
            part.capture_monotonic = part.capture_monotonic or time.monotonic()
            # by when the verdict must reach the PLC (reject timing, else line.deadline_ms)
            part.deadline = self.clock.deadline(part.capture_monotonic, part.encoder)
            self.taken += 1
        except Exception as exc:   # e.g. a reject timing that overflows for this encoder count
            log.warning("part %r could not be stamped: %s", part.part_id, one_line(exc))
            part.deadline = time.monotonic() + 1.0
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"deadline not computable: {one_line(exc)}")
            self.output.put(part)
            return
        try:
            self._queue.put_nowait(part)
        except queue.Full:
            part.decide(Verdict.NO_VERDICT, Reason.OVERLOAD,
                        f"engine queue full ({self.config.line.queue_size} parts waiting)")
            self.output.put(part)

    def _fault_part(self, exc: BaseException) -> None:
        """The NO_VERDICT (decode_error) row of the trigger whose frame the source failed on (its id unknown)."""
        self._faults += 1
        part = PartRecord(part_id=f"SOURCE-FAULT-{int(time.time() * 1e3)}-{self._faults}",
                          recipe=self._recipe, capture_time=time.time())
        part.decide(Verdict.NO_VERDICT, Reason.DECODE_ERROR,
                    f"the frame source failed on this frame: {type(exc).__name__}: {one_line(exc)}"[:500])
        self.take(part)

    def close(self) -> None:
        try:
            self.source.close()
        except Exception:
            log.debug("source close raised", exc_info=True)
