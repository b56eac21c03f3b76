"""The prefetch stage, on the line's prefetch thread: each part from the engine queue goes to the extract threads
(decode and features, ``line.extract_workers`` side by side) and its pending result is queued in arrival order,
so the worker scores parts in the order they came while the next ones are extracted."""
from __future__ import annotations

import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor

from ..record import PartRecord
from .inspector import Inspector
from .messages import END, End, Extracting


class PrefetchStage:
    """``engine_queue`` (PartRecord, then END) -> ``ready`` (Extracting, then END)."""

    def __init__(self, inspector: Inspector, extract_workers: int, engine_queue: queue.Queue[PartRecord | End],
                 ready: queue.Queue[Extracting | End]):
        self.inspector, self.extract_workers, self._in, self._ready = inspector, extract_workers, engine_queue, ready

    def run(self) -> None:
        """Extract the next parts on the extract threads while earlier ones are scored and signalled."""
        with ThreadPoolExecutor(self.extract_workers, thread_name_prefix="extract") as extract:
            while not isinstance(part := self._in.get(), End):
                try:
                    pending = extract.submit(self._extract, part)
                except Exception as exc:   # handed on as this part's failed extraction (its NO_VERDICT)
                    pending = Future()
                    pending.set_exception(exc)
                self._ready.put(Extracting(part, pending))
            self._ready.put(END)

    def _extract(self, part: PartRecord) -> object | None:
        # A part already late is not worked on: the worker gives it its NO_VERDICT (deadline).
        return self.inspector.extract(part) if time.monotonic() < part.deadline else None

    def gone(self) -> None:
        """The prefetch thread stopped for good: the parts still queued go to the worker as failed
        extractions (each its NO_VERDICT row), then the end."""
        while not isinstance(part := self._in.get(), End):
            failed: Future = Future()
            failed.set_exception(RuntimeError("the prefetch thread stopped (line stopping)"))
            self._ready.put(Extracting(part, failed))
        self._ready.put(END)
