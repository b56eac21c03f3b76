"""Pool persistence off the scoring path: the worker only copies the pools (``Inspector.snapshot_pools``), and
the pool-writer thread, at low priority, writes the copies to disk (``Inspector.write_pools``, pool_store.py)."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from ..background import lower_this_thread
from .faults import one_line
from .inspector import Inspector
from .messages import END, End

log = logging.getLogger(__name__)


class PoolWriter:
    """Snapshots in order, one waiting at most; the writer thread never dies (a blocked queue would block pool
    changes and shutdown), a failed write is alarmed and the next one tries again."""

    def __init__(self, inspector: Inspector, on_alarm: Callable[[str], None]):
        self.inspector, self._on_alarm = inspector, on_alarm
        self._queue: queue.Queue[object | End] = queue.Queue(maxsize=1)
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pool-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Write what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(END)
            self._thread.join(timeout=timeout)

    def save_now(self) -> None:
        """Queue a snapshot of the pools as they are (worker thread, after a change), after any queued one."""
        self._queue.put(self.inspector.snapshot_pools())

    def save_periodically(self) -> None:
        """Queue a snapshot when the shortest ``pool.persist_every_s`` has passed (worker thread, per part)."""
        every = min(rp.settings.pool.persist_every_s for rp in self.inspector.recipes.values())
        if time.monotonic() - self._last < every:
            return
        self._last = time.monotonic()
        try:
            self._queue.put_nowait(self.inspector.snapshot_pools())
        except queue.Full:
            log.debug("pool persistence still busy; the next period will catch up")
        except Exception as exc:   # e.g. no memory for the copy: the next period tries again
            self._on_alarm(f"pool snapshot failed: {one_line(exc)}")

    def _run(self) -> None:
        lower_this_thread()
        while not isinstance(snapshot := self._queue.get(), End):
            try:
                self.inspector.write_pools(snapshot)
            except Exception as exc:
                log.debug("pool write failed", exc_info=True)
                self._on_alarm(f"pool could not be saved: {one_line(exc)}")
