"""The running line: its threads and their wiring.

    source --(bounded queue)--> prefetch --(arrival order)--> worker --> output --> ledger, PLC, archive

- *source* (``source_stage.py``): pulls parts at the line's pace and stamps each with its deadline; when the
  engine queue is full the part gets NO_VERDICT (overload) on the spot and goes straight to the output stage.
  Nothing is dropped: every part reaches the output stage exactly once.
- *prefetch*: hands each part to ``line.extract_workers`` extract threads (decode and features, side by side)
  and queues its pending result in arrival order, so the worker scores parts in the order they came while
  the next ones are extracted.
- *worker*: the look-ahead window, then one part at a time through the rest of the inspector (scoring,
  verdict) and pool admission; a part whose deadline has passed gets NO_VERDICT (deadline). Control changes
  (``control_handlers.py``) run here, between two parts, and so does putting a calibration in force.
- *output* (``output.py``): the fail-safe policy, the ledger row (durable; its row id is the wire sequence
  number), *then* the PLC within the part's deadline, acks, the archive. The only thread that writes the ledger.
- *pool-writer* (``pool_writer.py``), *status* (``live_status.py``), *control* (``control.py``).

What travels on the queues: ``messages.py``. The calibration in force: one immutable ``InForce``
(``in_force.py``). Thread restarts and what stops the line: ``faults.py``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

from threadpoolctl import threadpool_limits

from ..config import LineConfig
from ..ledger import Ledger
from ..links import RejectLink
from ..record import PartRecord, Reason, Verdict
from ..sources.base import FrameSource, make_source
from ..sources.sender_frames import RESUME_ROWS
from ..telemetry import Telemetry
from .calibration_state import Authorised, CalibrationAuthority
from .control import ControlServer, ensure_token
from .control_handlers import BetweenParts, ControlHandlers
from .deadline import DeadlineClock
from .faults import LineStopped, StartupError, keep_alive, one_line
from .in_force import InForce
from .inspector import Inspector
from .live_status import LineStats, control_status, status_line
from .look_ahead import LookAheadWindow
from .messages import END, End, Extracting
from .output import OutputStage
from .prefetch import PrefetchStage
from .pool_writer import PoolWriter
from .source_stage import SourceStage
from .storage_lock import StorageLock
from .systemd import SystemdNotifier

__all__ = ["Line", "LineStopped", "StartupError"]
log = logging.getLogger(__name__)


def _newest_refs(ledger: Ledger) -> Iterator[str | None]:
    """The ``source_ref`` of the ledger's newest RESUME_ROWS rows, oldest first; read when first iterated."""
    for row in reversed(ledger.recent(RESUME_ROWS)):
        yield row.source_ref


class Line:
    """Owns the runtime's threads and resources. ``run()`` blocks until ``stop()``, the end of a finite source
    (a replay without ``loop``; ``ended`` says so), or a fault it cannot survive (``LineStopped``)."""

    source_give_up_s = 60.0   # a source that cannot be read for this long stops the line (non-zero exit)

    def __init__(self, config: LineConfig, *, source: FrameSource | None = None, inspector: Inspector | None = None,
                 status: Callable[[str], None] | None = None, status_every_s: float = 1.0):
        self.config = config
        self.storage = Path(config.storage.dir)
        # before anything reads the storage or repairs it (calibration, pools): one running line per storage.dir
        self._storage_lock = StorageLock.acquire(self.storage)   # creates the folder
        try:
            self.stats = LineStats()
            self._output: OutputStage | None = None
            self.inspector = inspector or Inspector(config)
            self.inspector.on_alarm = self._on_alarm
            self.source = source or make_source(config.source)
            if hasattr(self.source, "on_alarm"):   # a source with alarms of its own (lost frames, reconnects)
                self.source.on_alarm = self._on_alarm
            self._clock = DeadlineClock(config.line.deadline_ms / 1e3)
            self.authority = CalibrationAuthority(self.storage, set(config.recipes), f"runtime:{config.line.name}")
            # refuses a current.json that is not audited
            self._put_in_force(self.authority.at_start(config.line.name))
            self.model_hash = self.inspector.engine.manifest.model_sha256[:16]
            self.inspector.on_fast_path = self._on_fast_path   # before restore_pools: a restored fast path is recorded
            self._status = status
            self._status_every = status_every_s
            self._in: queue.Queue[PartRecord | End] = queue.Queue(maxsize=config.line.queue_size)
            # parts and the futures of their extraction, in arrival order; bounded so at most a few run ahead of scoring
            self._ready: queue.Queue[Extracting | End] = queue.Queue(maxsize=config.line.extract_workers)
            # extracted parts waiting for their look-ahead references, oldest first (the worker's)
            self._window = LookAheadWindow(lambda recipe: config.recipes[recipe].look_ahead)
            self._between_parts = BetweenParts()
            self.control: ControlServer | None = None
            self.systemd = SystemdNotifier()
            self._stop = threading.Event()
            pool_alarms: list[str] = []   # raised once telemetry is up (below)
            self.restored = self.inspector.restore_pools(on_alarm=pool_alarms.append)
            self._pools = PoolWriter(self.inspector, self._on_alarm)
            self.telemetry = Telemetry(config.telemetry, config.line.name, self.storage, status=self.control_status)
            for name, settings, exporter in (("Prometheus", config.telemetry.prometheus, self.telemetry.prometheus),
                                             ("MQTT", config.telemetry.mqtt, self.telemetry.mqtt)):
                if settings.enabled and exporter is None:   # the line inspects without it; status and view say so
                    self._on_alarm(f"telemetry: no {name} exporter on {settings.host}:{settings.port} (see the log)")
            for text in pool_alarms:
                self._on_alarm(text)
            self._output = OutputStage(config, self.storage, stats=self.stats, telemetry=self.telemetry,
                                       in_force=lambda: self.in_force, model_hash=lambda: self.model_hash,
                                       on_alarm=self._on_alarm, fatal_fault=self._fatal_fault, stopping=self._stop)
            self._handle_control = ControlHandlers(
                config, self.inspector, self.authority, between_parts=self._between_parts,
                in_force=lambda: self.in_force, put_in_force=self._put_in_force, save_pools=self._pools.save_now,
                signal_test_part=self._output.signal_and_wait, status=self.control_status).handle
            self.ended: str | None = None    # why run() returned: "stop requested", "replay finished: ..."
            self._fatal: str | None = None   # a fault the line cannot survive: run() raises LineStopped with it
        except BaseException:
            self._storage_lock.release()
            raise

    @property
    def link(self) -> RejectLink | None:
        return None if self._output is None else self._output.link

    @property
    def archive(self):
        return None if self._output is None else self._output.archive

    # -- lifecycle -------------------------------------------------------------------------------------------
    def run(self) -> LineStats:
        """Inspect every part the source delivers; returns the final counters."""
        # numpy's BLAS (admission, the pool guard, warm-up scoring) stays on one thread: its idle workers spin,
        # and the cores are already shared out between the extract workers and the scorer.
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                return self._run()
        finally:
            self._storage_lock.release()

    def _run(self) -> LineStats:
        from ..ports import line_ports, port_problems

        # A link or frame socket that cannot listen would leave a line that signals nothing looking healthy.
        problems = port_problems(line_ports(self.config, view=False, telemetry=False))
        if problems:
            raise StartupError(problems[0])
        ledger = Ledger(self.storage / "ledger.sqlite")
        control_path = self.config.control.socket or self.storage / "control.sock"
        try:
            token = ensure_token(self.storage)
        except OSError as exc:  # e.g. a full disk: no usable token means no changes, never "no token needed"
            self._on_alarm(f"technician token could not be written ({exc}); the control socket refuses changes")
            token = ""
        self.control = ControlServer(control_path, token, self._handle_control)
        self._output.open(ledger)
        self.source.resume(_newest_refs(ledger))   # read only by a source that numbers its frames
        source = SourceStage(self.config, self.source, self._clock, engine_queue=self._in, output=self._output,
                             stopping=self._stop, on_alarm=self._on_alarm, fatal_fault=self._fatal_fault,
                             finished=self._finished, give_up_s=self.source_give_up_s)
        prefetch = PrefetchStage(self.inspector, self.config.line.extract_workers, self._in, self._ready)
        restart = dict(on_alarm=self._on_alarm, on_fatal=self._fatal_fault)
        threads = [threading.Thread(target=source.run, name="source", daemon=True),
                   threading.Thread(target=keep_alive(prefetch.run, "prefetch", pass_end_on=prefetch.gone, **restart),
                                    name="prefetch", daemon=True),
                   threading.Thread(target=keep_alive(self._worker_loop, "worker", pass_end_on=self._worker_gone,
                                                      **restart), name="worker", daemon=True)]
        self._pools.start()
        status = threading.Thread(target=keep_alive(self._status_loop, "status", **restart), name="status",
                                  daemon=True)
        for t in threads:
            t.start()
        status.start()
        self.systemd.ready(f"line {self.config.line.name}: pools {self.restored}")
        try:
            self._output.run(fatal=lambda: self._fatal)
        finally:
            self._stop.set()
            for t in threads:
                t.join(timeout=5)
            self._pools.stop(timeout=30)
            self._shutdown()
        return self.stats

    def stop(self) -> None:
        """Ask the line to finish: the source stops, queued parts are still decided and signalled."""
        self.ended = self.ended or "stop requested"
        self._stop.set()
        self._close_source()

    def raise_alarm(self, text: str) -> None:
        """An alarm from outside the line's threads (e.g. its companion view process ended), while it runs:
        logged, exported and shown by status and the view like the line's own."""
        if not self._stop.is_set():
            self._on_alarm(text)

    def _shutdown(self) -> None:
        self.systemd.stopping()
        if self.control is not None:
            self.control.close()
        self._between_parts.run_pending()
        try:
            self.inspector.save_pools()
        except Exception as exc:  # e.g. a full disk: the last periodic save stands, and the temp file is gone
            self._on_alarm(f"pool could not be saved at shutdown: {one_line(exc)}")
        self._output.close()
        self.telemetry.close()

    def _finished(self, why: str) -> None:
        self.ended = why

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception:  # closing a source that is mid-read may race; the loop ends either way
            log.debug("source close raised", exc_info=True)

    def _fatal_fault(self, text: str) -> None:
        """A fault the line cannot survive: alarmed, and ``run()`` ends with ``LineStopped(text)``."""
        self._fatal = self._fatal or text
        self._on_alarm(f"line stopping: {text}")
        self._stop.set()
        self._close_source()

    # -- the worker thread ------------------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        """Score parts in arrival order; with look-ahead a part waits in the window for later parts
        (:mod:`.look_ahead`) until it is due, and a part that cannot wait is scored on what is there."""
        window, ending = self._window, False
        while True:
            self.systemd.watchdog()  # from the scoring loop itself: a hung engine call stops the pings
            self._between_parts.run_pending()
            if not ending:
                try:
                    item = self._ready.get(timeout=window.wait_s(time.monotonic(), 0.05))
                except queue.Empty:
                    item = None
                if isinstance(item, End):
                    ending = True
                elif item is not None:
                    window.add(item.part, self._extracted(item))
            while (head := window.due(time.monotonic(), ending or self._stop.is_set())) is not None:
                self._decide(head.part, head.extracted, [(w.part, w.extracted) for w in window.references(head)])
            if ending:
                self._between_parts.run_pending()
                self._output.end()
                return

    def _worker_gone(self) -> None:
        """The worker thread stopped for good: every part still in the pipeline gets its NO_VERDICT row from
        the output stage, then the end."""
        why = "the worker thread stopped (line stopping)"
        for waiting in self._window.drain():
            if waiting.part.verdict is None:
                waiting.part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, why)
            self._output.put(waiting.part)
        while True:
            try:
                item = self._ready.get(timeout=30)
            except queue.Empty:   # the prefetch thread is gone too: nothing more will come
                break
            if isinstance(item, End):
                break
            item.part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, why)
            self._output.put(item.part)
        self._output.end()

    @staticmethod
    def _extracted(item: Extracting) -> object | None:
        try:
            return item.pending.result()
        except Exception as exc:  # extract() decides bad parts itself; this is a fault in the engine
            log.exception("extraction failed for part %s", item.part.part_id)
            item.part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"extraction failed: {exc}")
            return None

    def _decide(self, part: PartRecord, extracted: object | None, look_ahead: list) -> None:
        """Score one part (against the pool and its look-ahead references), admit it, pass it to output."""
        deadline = part.deadline
        in_force = self.in_force  # read once: the calibration stamped on the row is the one that decided it
        if time.monotonic() >= deadline:
            self.inspector.admit_late_warmup(part, extracted)   # its features may still fill a warming pool
            part.decide(Verdict.NO_VERDICT, Reason.DEADLINE, "deadline passed while queued")
            self._output.put(part, in_force)
            return
        try:
            part, prepared = self.inspector.inspect(part, extracted, look_ahead)
        except Exception as exc:   # inspect() decides bad parts itself; this is a fault in scoring
            log.exception("scoring failed for part %s", part.part_id)
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"scoring failed: {one_line(exc)}")
            prepared = None
        self._window.record_scoring(part.times.scoring)
        part.look_ahead = len(look_ahead)
        if time.monotonic() > deadline and part.verdict != Verdict.NO_VERDICT:
            part.decide(Verdict.NO_VERDICT, Reason.DEADLINE,
                        f"scored {part.verdict.value} after the deadline (score {part.score:.4f})")
        try:
            self.inspector.admit(part, prepared)
        except Exception as exc:   # the verdict stands; the pool did not take this part
            log.exception("pool admission failed for part %s", part.part_id)
            self._on_alarm(f"pool admission failed for part {part.part_id}: {one_line(exc)}")
        self._output.put(part, in_force)
        self._pools.save_periodically()

    # -- the calibration in force ----------------------------------------------------------------------------
    def _put_in_force(self, authorised: Authorised) -> None:
        """Put an audited calibration in force (worker thread between two parts, or before the line runs): the
        recipes' thresholds, the reject timing, then the one ``InForce`` every stage reads, and the link's."""
        in_force = InForce.of(authorised, self.config.line.dry_run)
        if in_force.calibration is not None:
            for name, recipe in in_force.calibration.recipes.items():
                self.inspector.recipes[name].threshold = recipe.threshold
            self._clock.timing = in_force.reject_timing
        self.in_force = in_force
        if self.link is not None:   # None before the link opens (the start-up calibration)
            self.link.set_calibration_version(in_force.version)

    def _on_fast_path(self, event) -> None:
        """The fast-path decision (runtime/fast_path.py): rows from now on carry the model that decides them, and
        the audit log says what was switched and why (or why not)."""
        self.model_hash = event.new_model[:16]
        log.info("fast path: %s", event.reason)
        try:
            self.authority.record_fast_path(event)
        except Exception as exc:   # the decision stands; the record is what is missing
            log.warning("fast-path decision could not be audited: %s", one_line(exc))
            if hasattr(self, "telemetry"):   # a decision taken while restoring pools comes before telemetry
                self._on_alarm(f"fast-path decision could not be audited: {one_line(exc)}")

    # -- alarms and status -----------------------------------------------------------------------------------
    def _on_alarm(self, text: str) -> None:
        log.warning("ALARM: %s", text)
        self.telemetry.alarm(text)
        self.stats.alarm(text)

    def control_status(self) -> dict:
        """What `musc-calibrate status` shows of a running line."""
        return control_status(self.config.line.name, self.in_force, self.inspector.recipes, self.stats, self.link,
                              self._in.qsize(), str(self.storage))

    def status_line(self) -> str:
        return status_line(self.stats, self.inspector.recipes, self.link)

    def _status_loop(self) -> None:
        while not self._stop.wait(self._status_every):
            if self._status:
                try:
                    self._status(self.status_line())
                except Exception:   # the status display is not worth a thread restart storm
                    log.debug("status line failed", exc_info=True)

    def ledger_rows(self) -> list:
        """Every ledger row, read through a separate read-only connection."""
        reader = Ledger.open_readonly(self.storage / "ledger.sqlite")
        try:
            return list(reader.iter_rows())
        finally:
            reader.close()
