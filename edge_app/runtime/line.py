"""The running line: source -> bounded queue -> inspector -> ledger -> reject link -> archive.

Threads and their contracts:
- *source*: pulls parts at the line's pace and stamps each with its deadline; when the engine queue is
  full the part gets NO_VERDICT (overload) on the spot and goes straight to the output stage. Nothing is
  dropped: every part reaches the output stage exactly once.
- *prefetch*: hands each part to ``line.extract_workers`` extract threads (decode and features, side by side)
  and queues its pending result in arrival order, so the worker scores parts in the order they came while
  the next ones are extracted.
- *worker*: one part at a time through the rest of the inspector (scoring, verdict) and pool admission;
  a part whose deadline has passed gets NO_VERDICT (deadline).
- *output*: applies the fail-safe policy, writes the ledger row durably (its row id is the wire sequence
  number), *then* signals the PLC within the part's deadline, records acks (also late ones, reported by
  the link), and hands rejects to the archive. It is the only thread that writes the ledger.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from ..archive import RejectArchive
from ..background import idle_this_thread, lower_this_thread
from ..config import LineConfig
from ..ledger import Ledger
from ..links import RejectLink, open_link
from ..pool import leave_one_out_scores
from ..record import FailSafe, PartRecord, Reason, Verdict
from ..scoring import PoolTooSmallError
from ..sources.base import FrameSource, SourceConfigError, SourceError, make_source
from ..sources.fields import PartFieldError, check_part_fields, quarantine, require_part_id
from ..telemetry import Telemetry
from . import commands
from .calibration_state import (AuditError, Authorised, Calibration, CalibrationAuthority, CalibrationError,
                                RejectTiming, StoreError, parse_calibration)
from .control import ControlError, ControlServer, ensure_token
from .deadline import DeadlineClock
from .look_ahead import LookAheadWindow
from .inspector import Inspector
from .systemd import SystemdNotifier

log = logging.getLogger(__name__)
_DONE = object()
RECENT = 10_000  # parts kept for live latency percentiles
LOO_REUSE_S = 10.0  # a pool's leave-one-out scores younger than this answer `pool_scores` again
SOURCE_RETRY_S = (0.2, 5.0)   # a failed source is reopened after 0.2 s, doubling up to 5 s
FRAME_FAULTS_BEFORE_REOPEN = 20   # faults in a row, no part between them: the source is reopened
THREAD_FAULTS, THREAD_FAULT_WINDOW_S = 10, 60.0   # a thread that faults this often in this window stops the line
LINK_RESTARTS = 3   # a reject link that stops this often within THREAD_FAULT_WINDOW_S stops the line


class LineStopped(RuntimeError):
    """The line cannot go on without losing something (the ledger cannot be written): nothing was lost,
    the PLC's inspect window rejects the parts that follow. The message says why, in one line."""


class StartupError(LineStopped):
    """The line cannot start as configured (a port it must listen on is taken, ...); one line says why."""


def signalled_verdict(part: PartRecord, fail_safe: FailSafe) -> Verdict:
    """What goes to the PLC: the verdict itself, or the fail-safe action when there is none."""
    if part.verdict in (Verdict.ACCEPT, Verdict.REJECT):
        return part.verdict
    return Verdict.ACCEPT if fail_safe == FailSafe.PASS_FLAGGED else Verdict.REJECT


@dataclass
class LineStats:
    """Live counters kept by the output thread (the ledger holds the durable truth)."""

    parts: int = 0
    by_verdict: dict[str, int] = field(default_factory=lambda: {v.value: 0 for v in Verdict})
    by_reason: dict[str, int] = field(default_factory=dict)
    acked: int = 0
    late_acks: int = 0
    send_failures: int = 0
    # Recent scored parts only (bounded: a line runs for months); the ledger keeps every part.
    stages: dict[str, deque] = field(default_factory=lambda: {k: deque(maxlen=RECENT) for k in
                                                            ("decode", "features", "scoring", "link", "total")})
    alarms: deque = field(default_factory=lambda: deque(maxlen=100))

    def percentiles(self, values) -> dict[str, float]:
        if not values:
            return {}
        arr = np.asarray(values) * 1e3
        return {"min": float(arr.min()), "p50": float(np.median(arr)), "p99": float(np.percentile(arr, 99)),
                "max": float(arr.max())}


class Line:
    """Owns the runtime's threads and resources. ``run()`` blocks until ``stop()``, the end of a finite source
    (a replay without ``loop``; ``ended`` says so), or a fault it cannot survive (``LineStopped``)."""

    source_give_up_s = 60.0   # a source that cannot be read for this long stops the line (non-zero exit)

    def __init__(self, config: LineConfig, *, source: FrameSource | None = None, inspector: Inspector | None = None,
                 status: Callable[[str], None] | None = None, status_every_s: float = 1.0):
        self.config = config
        self.storage = Path(config.storage.dir)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.inspector = inspector or Inspector(config)
        self.inspector.on_alarm = self._on_alarm
        self.source = source or make_source(config.source)
        if hasattr(self.source, "on_alarm"):   # a source that alarms and recovers by itself (genicam reconnects)
            self.source.on_alarm = self._on_alarm
        self.calibration_version = "0"
        self.dry_run = config.line.dry_run
        self.reject_timing: RejectTiming | None = None
        self._clock = DeadlineClock(config.line.deadline_ms / 1e3)
        self.authority = CalibrationAuthority(self.storage, set(config.recipes), f"runtime:{config.line.name}")
        self.in_force = self.authority.at_start(config.line.name)   # refuses a current.json that is not audited
        if self.in_force.calibration is not None:
            self._apply_calibration(self.in_force.calibration)
        self.model_hash = self.inspector.engine.manifest.model_sha256[:16]
        self.inspector.on_fast_path = self._on_fast_path   # before restore_pools: a restored fast path is recorded
        self.config_hash = config.config_hash()
        self.stats = LineStats()
        self._status = status
        self._status_every = status_every_s
        self._in: queue.Queue = queue.Queue(maxsize=config.line.queue_size)
        # (part, future of its extraction) in arrival order; bounded so at most a few parts run ahead of scoring
        self._ready: queue.Queue = queue.Queue(maxsize=config.line.extract_workers)
        # extracted parts waiting for their look-ahead references, oldest first (the worker's)
        self._window = LookAheadWindow(lambda recipe: config.recipes[recipe].look_ahead)
        self._out: queue.Queue = queue.Queue()
        self._acks: queue.Queue = queue.Queue()
        self._tasks: queue.Queue = queue.Queue()       # control changes, run by the worker between parts
        self._persist: queue.Queue = queue.Queue(maxsize=1)  # pool snapshots for the writer thread
        self.control: ControlServer | None = None
        self._waiters: dict[int, threading.Event] = {}
        self._loo_lock = threading.Lock()
        self._loo_cache: dict[str, tuple[float, list[float]]] = {}
        self.systemd = SystemdNotifier()
        self._stop = threading.Event()
        self._stats_lock = threading.Lock()
        self._deadline_s = config.line.deadline_ms / 1e3
        pool_alarms: list[str] = []   # raised once telemetry is up (below)
        self.restored = self.inspector.restore_pools(on_alarm=pool_alarms.append)
        self._last_persist = time.monotonic()
        self.ledger: Ledger | None = None
        self.link: RejectLink | None = None
        self.archive: RejectArchive | None = None
        self.telemetry = Telemetry(config.telemetry, config.line.name, self.storage, status=self.control_status)
        for name, settings, exporter in (("Prometheus", config.telemetry.prometheus, self.telemetry.prometheus),
                                         ("MQTT", config.telemetry.mqtt, self.telemetry.mqtt)):
            if settings.enabled and exporter is None:   # the line inspects without it; status and view say so
                self._on_alarm(f"telemetry: no {name} exporter on {settings.host}:{settings.port} (see the log)")
        for text in pool_alarms:
            self._on_alarm(text)
        self.ended: str | None = None    # why run() returned: "stop requested", "replay finished: ..."
        self._fatal: str | None = None   # a fault the line cannot survive: run() raises LineStopped with it
        self._source_faults = self._taken = 0
        self._link_restarts: deque = deque(maxlen=LINK_RESTARTS)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def run(self) -> LineStats:
        """Inspect every part the source delivers; returns the final counters."""
        # numpy's BLAS (admission, the pool guard, warm-up scoring) stays on one thread: its idle workers spin,
        # and the cores are already shared out between the extract workers and the scorer.
        with threadpool_limits(limits=1, user_api="blas"):
            return self._run()

    def _run(self) -> LineStats:
        from ..ports import line_ports, port_problems

        # A link or frame socket that cannot listen would leave a line that signals nothing looking healthy.
        problems = port_problems(line_ports(self.config, view=False, telemetry=False))
        if problems:
            raise StartupError(problems[0])
        self.ledger = Ledger(self.storage / "ledger.sqlite")
        control_path = self.config.control.socket or self.storage / "control.sock"
        try:
            token = ensure_token(self.storage)
        except OSError as exc:  # e.g. a full disk: no usable token means no changes, never "no token needed"
            self._on_alarm(f"technician token could not be written ({exc}); the control socket refuses changes")
            token = ""
        self.control = ControlServer(control_path, token, self._handle_control)
        # The link is up even in dry-run: dry-run is a calibration switch that can change while running,
        # and heartbeats and test fires still go out.
        self.link = self._open_link()
        archive = self.config.storage.archive
        if archive.enabled:
            self.archive = RejectArchive(self.storage / "archive", int(archive.quota_mb * 2**20),
                                         accepted_fraction=archive.sample_accepted, no_verdict_fraction=1.0,
                                         image_format=archive.image_format,
                                         min_free_fraction=archive.min_free_percent / 100, on_alarm=self._on_alarm)
        threads = [threading.Thread(target=self._source_loop, name="source", daemon=True),
                   threading.Thread(target=self._keep_alive(self._prefetch_loop, "prefetch", self._prefetch_gone),
                                    name="prefetch", daemon=True),
                   threading.Thread(target=self._keep_alive(self._worker_loop, "worker", self._worker_gone),
                                    name="worker", daemon=True)]
        persist = threading.Thread(target=self._persist_loop, name="pool-writer", daemon=True)
        persist.start()
        status = threading.Thread(target=self._keep_alive(self._status_loop, "status"), name="status", daemon=True)
        for t in threads:
            t.start()
        status.start()
        self.systemd.ready(f"line {self.config.line.name}: pools {self.restored}")
        try:
            self._output_loop()
        finally:
            self._stop.set()
            for t in threads:
                t.join(timeout=5)
            self._persist.put(None)
            persist.join(timeout=30)
            self._shutdown()
        return self.stats

    def stop(self) -> None:
        """Ask the line to finish: the source stops, queued parts are still decided and signalled."""
        self.ended = self.ended or "stop requested"
        self._stop.set()
        try:
            self.source.close()
        except Exception:  # closing a source that is mid-read may race; the loop ends either way
            log.debug("source close raised", exc_info=True)

    def raise_alarm(self, text: str) -> None:
        """An alarm from outside the line's threads (e.g. its companion view process ended), while it runs:
        logged, exported and shown by status and the view like the line's own."""
        if not self._stop.is_set():
            self._on_alarm(text)

    def _shutdown(self) -> None:
        self.systemd.stopping()
        if self.control is not None:
            self.control.close()
        self._run_tasks()
        try:
            self.inspector.save_pools()
        except Exception as exc:  # e.g. a full disk: the last periodic save stands, and the temp file is gone
            self._on_alarm(f"pool could not be saved at shutdown: {_one_line(exc)}")
        if self.link is not None:
            deadline = time.monotonic() + 2.0
            while self.link.health().outbox_depth and time.monotonic() < deadline:
                time.sleep(0.02)
            self._drain_acks_or_alarm()
            self.link.close()
        self._drain_acks_or_alarm()
        if self.archive is not None:
            self.archive.close(timeout=10)
        if self.ledger is not None:
            self.ledger.close()
        self.telemetry.close()

    # -- threads ---------------------------------------------------------------------------------------------
    def _source_loop(self) -> None:
        """Parts from the source until ``stop()`` or the end of a finite source. A fault while a frame is read
        gives that trigger a NO_VERDICT row and the source is read on; a source that fails (or ends by itself)
        is alarmed and reopened. A source that cannot be read for ``source_give_up_s``, whose config is wrong,
        or a finite one that fails (reopening would replay it) stops the line (``LineStopped``)."""
        failing_since: float | None = None
        faults_in_a_row, retry = 0, SOURCE_RETRY_S[0]
        try:
            while not self._stop.is_set():
                opened = None
                try:
                    self.source.open()
                    opened = time.monotonic()
                    for part in self.source.parts():
                        failing_since, faults_in_a_row, retry = None, 0, SOURCE_RETRY_S[0]
                        self._take(part)
                        if self._stop.is_set():
                            break
                    if self._stop.is_set():
                        return
                    if self.source.finite:
                        self.ended = f"{self.source.describe()} finished after {self._taken} parts"
                        log.warning("%s: the line stops%s", self.ended, " (set source.loop: true to replay forever)"
                                    if self.config.source.get("type") == "replay" else "")
                        return
                    raise SourceError(f"{self.source.describe()} ended by itself")
                except Exception as exc:
                    if self._stop.is_set():
                        return
                    device = isinstance(exc, SourceError) or opened is None   # opening it concerns no frame
                    if not device:   # a fault while reading one frame: that trigger's row, then read on
                        log.exception("frame source fault")
                        faults_in_a_row += 1
                        self._source_fault_part(exc)
                    if isinstance(exc, SourceConfigError) or self.source.finite:
                        self._fatal_fault(f"frame source {self.source.describe()} failed: {_one_line(exc)}")
                        return
                    if device or faults_in_a_row >= FRAME_FAULTS_BEFORE_REOPEN:
                        now = time.monotonic()
                        if opened is not None and now - opened >= SOURCE_RETRY_S[1]:   # it ran a while: a new streak
                            failing_since, retry = None, SOURCE_RETRY_S[0]
                        failing_since = failing_since or now
                        if now - failing_since >= self.source_give_up_s:
                            self._fatal_fault(f"frame source {self.source.describe()} could not be read for "
                                              f"{now - failing_since:.0f} s: {_one_line(exc)}")
                            return
                        if retry == SOURCE_RETRY_S[0]:   # the first failure of a streak; the rest are logged
                            self._on_alarm(f"frame source failed, reopening: {_one_line(exc)}")
                        else:
                            log.info("frame source still failing: %s", _one_line(exc))
                        self._close_source()
                        self._stop.wait(retry)
                        retry, faults_in_a_row = min(2 * retry, SOURCE_RETRY_S[1]), 0
        finally:
            self._close_source()
            self._in.put(_DONE)

    def _take(self, part: PartRecord) -> None:
        """Stamp a part from the source and queue it for the engine (NO_VERDICT overload when the queue is
        full, or when it cannot be stamped: either way it goes straight to the output stage)."""
        try:
            check_part_fields(part, default_recipe=self.config.source.get("recipe", "default"))
            part.capture_monotonic = part.capture_monotonic or time.monotonic()
            part.deadline = self._deadline(part)
            self._taken += 1
        except Exception as exc:   # e.g. a reject timing that overflows for this encoder count
            log.warning("part %r could not be stamped: %s", part.part_id, _one_line(exc))
            part.deadline = time.monotonic() + 1.0
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"deadline not computable: {_one_line(exc)}")
            self._out.put(("part", part, None))
            return
        try:
            self._in.put_nowait(part)
        except queue.Full:
            part.decide(Verdict.NO_VERDICT, Reason.OVERLOAD,
                        f"engine queue full ({self.config.line.queue_size} parts waiting)")
            self._out.put(("part", part, None))

    def _source_fault_part(self, exc: BaseException) -> None:
        """The NO_VERDICT (decode_error) row of the trigger whose frame the source failed on (its id unknown)."""
        self._source_faults += 1
        part = PartRecord(part_id=f"SOURCE-FAULT-{int(time.time() * 1e3)}-{self._source_faults}",
                          recipe=self.config.source.get("recipe", "default"), capture_time=time.time())
        part.decide(Verdict.NO_VERDICT, Reason.DECODE_ERROR,
                    f"the frame source failed on this frame: {type(exc).__name__}: {_one_line(exc)}"[:500])
        self._take(part)

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception:
            log.debug("source close raised", exc_info=True)

    def _fatal_fault(self, text: str) -> None:
        """A fault the line cannot survive: alarmed, and ``run()`` ends with ``LineStopped(text)``."""
        self._fatal = self._fatal or text
        self._on_alarm(f"line stopping: {text}")
        self._stop.set()
        self._close_source()

    def _prefetch_gone(self) -> None:
        """The prefetch thread stopped for good: the parts still queued go to the worker as failed
        extractions (each its NO_VERDICT row), then the end."""
        while (part := self._in.get()) is not _DONE:
            failed: Future = Future()
            failed.set_exception(RuntimeError("the prefetch thread stopped (line stopping)"))
            self._ready.put((part, failed))
        self._ready.put((_DONE, None))

    def _worker_gone(self) -> None:
        """The worker thread stopped for good: every part still in the pipeline gets its NO_VERDICT row from
        the output stage, then the end."""
        for waiting in self._window.drain():
            if waiting.part.verdict is None:
                waiting.part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, "the worker thread stopped (line stopping)")
            self._out.put(("part", waiting.part, None))
        while True:
            try:
                part, _ = self._ready.get(timeout=30)
            except queue.Empty:   # the prefetch thread is gone too: nothing more will come
                break
            if part is _DONE:
                break
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, "the worker thread stopped (line stopping)")
            self._out.put(("part", part, None))
        self._out.put(("done",))

    def _keep_alive(self, loop: Callable[[], None], name: str,
                    pass_end_on: Callable[[], None] | None = None) -> Callable[[], None]:
        """``loop``, started again when an exception escapes it (each loop decides single parts' faults
        itself; what escapes is a fault between parts). Faulting ``THREAD_FAULTS`` times within
        ``THREAD_FAULT_WINDOW_S`` stops the line; ``pass_end_on`` then tells the next stage it is over."""
        def run() -> None:
            faults: deque = deque(maxlen=THREAD_FAULTS)
            while True:
                try:
                    return loop()
                except Exception as exc:
                    log.exception("%s thread fault", name)
                    faults.append(time.monotonic())
                    if len(faults) == faults.maxlen and faults[-1] - faults[0] < THREAD_FAULT_WINDOW_S:
                        self._fatal_fault(f"the {name} thread failed {len(faults)} times within "
                                          f"{THREAD_FAULT_WINDOW_S:.0f} s, last: {type(exc).__name__}: "
                                          f"{_one_line(exc)}")
                        if pass_end_on is not None:
                            pass_end_on()
                        return
                    self._on_alarm(f"{name} thread fault, restarted: {type(exc).__name__}: {_one_line(exc)}")
                    time.sleep(0.05)
        return run

    def _prefetch_loop(self) -> None:
        """Extract (decode, features) the next parts on the extract threads while earlier ones are scored and
        signalled; their pending results are queued in arrival order."""
        with ThreadPoolExecutor(self.config.line.extract_workers, thread_name_prefix="extract") as extract:
            while True:
                part = self._in.get()
                if part is _DONE:
                    self._ready.put((_DONE, None))
                    return
                try:
                    pending = extract.submit(self._extract, part)
                except Exception as exc:   # handed on as this part's failed extraction (its NO_VERDICT)
                    pending = Future()
                    pending.set_exception(exc)
                self._ready.put((part, pending))

    def _extract(self, part: PartRecord) -> object | None:
        # A part already late is not worked on: the worker gives it its NO_VERDICT (deadline).
        return self.inspector.extract(part) if time.monotonic() < part.deadline else None

    def _worker_loop(self) -> None:
        """Score parts in arrival order; with look-ahead a part waits in the window for later parts
        (:mod:`.look_ahead`) until it is due, and a part that cannot wait is scored on what is there."""
        window, ending = self._window, False
        while True:
            self.systemd.watchdog()  # from the scoring loop itself: a hung engine call stops the pings
            self._run_tasks()
            if not ending:
                try:
                    part, pending = self._ready.get(timeout=window.wait_s(time.monotonic(), 0.05))
                except queue.Empty:
                    part = None
                if part is _DONE:
                    ending = True
                elif part is not None:
                    window.add(part, self._extracted(part, pending))
            while (head := window.due(time.monotonic(), ending or self._stop.is_set())) is not None:
                self._decide(head.part, head.extracted, [(w.part, w.extracted) for w in window.references(head)])
            if ending:
                self._run_tasks()
                self._out.put(("done",))
                return

    def _extracted(self, part: PartRecord, pending) -> object | None:
        try:
            return pending.result()
        except Exception as exc:  # extract() decides bad parts itself; this is a fault in the engine
            log.exception("extraction failed for part %s", part.part_id)
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"extraction failed: {exc}")
            return None

    def _decide(self, part: PartRecord, extracted: object | None, look_ahead: list) -> None:
        """Score one part (against the pool and its look-ahead references), admit it, pass it to output."""
        deadline = part.deadline
        in_force = self.in_force  # read once: the version stamped on the row is the one that decided it
        if time.monotonic() >= deadline:
            part.decide(Verdict.NO_VERDICT, Reason.DEADLINE, "deadline passed while queued")
            self._out.put(("part", part, None, in_force))
            return
        try:
            part, prepared = self.inspector.inspect(part, extracted, look_ahead)
        except Exception as exc:   # inspect() decides bad parts itself; this is a fault in scoring
            log.exception("scoring failed for part %s", part.part_id)
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"scoring failed: {_one_line(exc)}")
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
            self._on_alarm(f"pool admission failed for part {part.part_id}: {_one_line(exc)}")
        self._out.put(("part", part, prepared, in_force))
        self._maybe_persist()

    def _maybe_persist(self) -> None:
        """Periodic pool persistence: the worker only copies the pools; a writer thread does the disk I/O."""
        every = min(rp.settings.pool.persist_every_s for rp in self.inspector.recipes.values())
        if time.monotonic() - self._last_persist < every:
            return
        self._last_persist = time.monotonic()
        try:
            self._persist.put_nowait(self.inspector.snapshot_pools())
        except queue.Full:
            log.debug("pool persistence still busy; the next period will catch up")
        except Exception as exc:   # e.g. no memory for the copy: the next period tries again
            self._on_alarm(f"pool snapshot failed: {_one_line(exc)}")

    def _persist_loop(self) -> None:
        lower_this_thread()
        while (snapshot := self._persist.get()) is not None:
            try:
                self.inspector.write_pools(snapshot)
            except Exception as exc:   # never dies: a blocked writer queue would block pool changes and shutdown
                log.debug("pool write failed", exc_info=True)
                self._on_alarm(f"pool could not be saved: {_one_line(exc)}")

    def _output_loop(self) -> None:
        try:
            while True:
                try:
                    item = self._out.get(timeout=0.1)
                except queue.Empty:
                    self._drain_acks()
                    self._check_link()
                    continue
                if item[0] == "done":
                    if self._fatal is not None:
                        raise LineStopped(self._fatal)
                    return
                self._check_link()   # also under a steady flow of parts (the idle check above may never run)
                try:
                    self._emit(item[1], item[3] if len(item) > 3 else None)
                except (LineStopped, sqlite3.Error):
                    raise
                except Exception as exc:   # a fault of this part's signal, archive or telemetry: it, not the line
                    self._output_fault(item[1], exc)
        except sqlite3.Error as exc:  # an ack or link time that cannot be recorded (disk full, I/O error)
            self._on_alarm(f"ledger update failed, line stopping: {exc}")
            raise LineStopped(f"the ledger {self.ledger.path} cannot be updated ({exc}); unacknowledged "
                              "verdicts are re-sent at the next start") from None

    def _open_link(self) -> RejectLink:
        """A running reject link that has been handed every verdict not yet acknowledged (signalled before a
        crash, or by a link that stopped) and shows the calibration version in force."""
        link = open_link(self.config.link, epoch=self.ledger.line_epoch, storage_dir=self.storage,
                         on_ack=self._on_ack, on_alarm=self._on_alarm,
                         on_alarm_cleared=lambda text: log.info("alarm cleared: %s", text))
        for row in self.ledger.unacked():
            try:
                link.resend(row.seq, row.part_id, Verdict(row.signalled), Reason(row.reason))
            except ValueError as exc:  # a field the wire refuses: mark it, so it never blocks a start again
                self._unsendable(row.seq, row.part_id, str(exc))
        link.set_calibration_version(self.calibration_version)   # shown with each verdict by Modbus / OPC UA
        return link

    def _check_link(self) -> None:
        """A reject link whose worker stopped (a fault it could not survive) is replaced by a new one, which
        re-sends every unacknowledged verdict (output thread). A link that stops ``LINK_RESTARTS`` times
        within ``THREAD_FAULT_WINDOW_S`` stops the line (non-zero exit; systemd starts it afresh)."""
        if self.link is None or self.link.worker_alive or self._stop.is_set():
            return
        alarms = _one_line("; ".join(self.link.health().alarms) or "no alarm")
        self._link_restarts.append(time.monotonic())
        if len(self._link_restarts) == LINK_RESTARTS and \
                self._link_restarts[-1] - self._link_restarts[0] < THREAD_FAULT_WINDOW_S:
            self._fatal_fault(f"the {self.config.link.type} reject link stopped {LINK_RESTARTS} times within "
                              f"{THREAD_FAULT_WINDOW_S:.0f} s ({alarms})")
            return
        self._on_alarm(f"the {self.config.link.type} reject link stopped ({alarms}); opening it again")
        self.link.close()
        self.link = self._open_link()

    def _output_fault(self, part: PartRecord, exc: Exception) -> None:
        """After a fault in ``_emit``: a part without a ledger row is recorded NO_VERDICT (engine_error) once
        more; one with a row keeps it (unacknowledged, it is re-sent at the next start)."""
        log.exception("output stage failed for part %s", getattr(part, "part_id", "?"))
        self._on_alarm(f"output stage failed for part {str(part.part_id)[:80]!r} (seq {part.seq}): "
                       f"{type(exc).__name__}: {_one_line(exc)}")
        if part.seq is None:
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"output stage failed: {_one_line(exc)}"[:500])
            try:
                self._emit(part)
            except (LineStopped, sqlite3.Error):
                raise
            except Exception as again:
                self._on_alarm(f"part {str(part.part_id)[:80]!r} could not be recorded: {_one_line(again)}")
        waiter = self._waiters.pop(id(part), None)
        if waiter is not None:
            waiter.set()

    def _deadline(self, part: PartRecord) -> float:
        """Monotonic time by which the verdict must reach the PLC (reject timing, else line.deadline_ms)."""
        return self._clock.deadline(part.capture_monotonic, part.encoder)

    def _emit(self, part: PartRecord, in_force: Authorised | None = None) -> None:
        """Ledger first (durable), then the PLC, then the archive. No error of one part leaves here,
        except a ledger that cannot be written (LineStopped): then nothing may be signalled at all."""
        if in_force is None:  # decided outside the worker (overload, test fire): the version in force now
            in_force = self.in_force
        check_part_fields(part)  # the last line of defence: whatever created it, it must fit the ledger and wire
        part.signalled = signalled_verdict(part, self.config.line.fail_safe)
        calibration = in_force.calibration   # version, threshold and dry-run of one snapshot, taken together
        dry_run = (self.config.line.dry_run or (calibration is not None and calibration.dry_run)) \
            and not part.test_part
        part.times.total = time.monotonic() - part.capture_monotonic
        version = "0" if calibration is None else str(calibration.version)

        def record() -> int:
            return self.ledger.reserve(part, model_hash=self.model_hash, config_hash=self.config_hash,
                                       calibration_version=version, dry_run=dry_run)
        try:
            try:
                seq = record()
            except (ValueError, TypeError, OverflowError) as exc:  # the part's content, not the storage
                self._on_alarm(f"part {part.part_id[:80]!r} could not be recorded as it came: {exc}")
                quarantine(part, f"{type(exc).__name__}: {exc}")
                part.signalled = signalled_verdict(part, self.config.line.fail_safe)
                seq = record()
        except Exception as exc:
            # Without a durable row nothing may be signalled: stop, and let the PLC's inspect window
            # reject every part that gets no verdict (the documented fail-safe of the wire protocol).
            self._on_alarm(f"ledger write failed, line stopping: {exc}")
            raise LineStopped(f"the ledger {self.ledger.path} cannot be written ({exc}); the line stopped "
                              f"before part {part.part_id}, nothing signalled was lost") from None
        if self.link is not None and not dry_run:
            deadline = part.deadline or part.capture_monotonic + self._deadline_s
            t0 = time.monotonic()
            try:
                result = self.link.send(seq, part.part_id, part.signalled, part.reason, max(deadline, t0 + 0.05))
            except ValueError as exc:  # a field the wire refuses (check_part_fields should have caught it)
                self._unsendable(seq, part.part_id, str(exc))
                result = None
            except Exception as exc:   # a link fault: the row stays unacknowledged and is re-sent at the next start
                log.exception("link send failed for seq %s", seq)
                self._on_alarm(f"verdict seq {seq} (part {part.part_id[:80]!r}) not sent: {type(exc).__name__}: "
                               f"{_one_line(exc)}")
                result = None
            part.times.link = time.monotonic() - t0
            part.times.total = time.monotonic() - part.capture_monotonic
            self.ledger.update_link_time(seq, part.times.link, total=part.times.total)
            if result is None or not result.acked:
                with self._stats_lock:
                    self.stats.send_failures += 1
            part.acked = result is not None and result.acked
        waiter = self._waiters.pop(id(part), None)
        if waiter is not None:
            waiter.set()
        self._drain_acks()
        if self.archive is not None and not part.test_part:
            self.archive.submit(part)
        self._count(part)
        self.telemetry.part(part, self.calibration_version)
        if part.verdict == Verdict.NO_VERDICT and self.config.line.fail_safe == FailSafe.STOP_LINE \
                and part.reason != Reason.WARMUP:   # warm-up parts are rejected; the pool is not ready yet
            reason = f"no verdict: part {part.part_id} ({part.reason.label})"
            self._on_alarm(f"line stop requested: {reason}")
            if self.link is not None:
                self.link.send_stop_line(reason)
        part.image = part.raw = None  # free the frame; the ledger and archive have what they need

    def _unsendable(self, seq: int, part_id: str, why: str) -> None:
        """A row whose signal can never go out: marked in the ledger (never re-sent) and alarmed."""
        self.ledger.mark_unsendable(seq, why)
        self._on_alarm(f"verdict seq {seq} (part {part_id[:80]!r}) can never be sent: {why[:200]}")

    def _on_ack(self, seq: int, late: bool) -> None:
        # Runs on the link's thread: only the output thread writes the ledger, so hand the ack over.
        self._acks.put((seq, late, time.time()))

    def _drain_acks(self) -> None:
        while True:
            try:
                seq, late, when = self._acks.get_nowait()
            except queue.Empty:
                return
            self._record_ack(seq, late, when)

    def _drain_acks_or_alarm(self) -> None:
        try:
            self._drain_acks()
        except sqlite3.Error as exc:  # shutting down anyway: the unrecorded acks mean re-sends next start
            self._on_alarm(f"acknowledgements could not be recorded: {exc}")

    def _record_ack(self, seq: int, late: bool, when: float) -> None:
        self.ledger.mark_acked(seq, late=late, when=when)
        self.telemetry.ack(seq, late)
        with self._stats_lock:
            self.stats.acked += 1
            self.stats.late_acks += int(late)

    def _on_fast_path(self, event) -> None:
        """The fast-path decision (runtime/fast_path.py): rows from now on carry the model that decides them, and
        the audit log says what was switched and why (or why not)."""
        self.model_hash = event.new_model[:16]
        log.info("fast path: %s", event.reason)
        try:
            with self.authority.store.lock():
                self.authority.store.audit.append(
                    who=self.authority.who, action="runtime.fast_path", target="feature model", old=event.old_model,
                    new={"model_sha256": event.new_model, "scorer": event.scorer, "switched": event.switched},
                    reason=event.reason)
        except Exception as exc:   # the decision stands; the record is what is missing
            log.warning("fast-path decision could not be audited: %s", _one_line(exc))
            if hasattr(self, "telemetry"):   # a decision taken while restoring pools comes before telemetry
                self._on_alarm(f"fast-path decision could not be audited: {_one_line(exc)}")

    def _on_alarm(self, text: str) -> None:
        log.warning("ALARM: %s", text)
        self.telemetry.alarm(text)
        with self._stats_lock:
            self.stats.alarms.append(text)

    def _count(self, part: PartRecord) -> None:
        with self._stats_lock:
            s = self.stats
            s.parts += 1
            s.by_verdict[part.verdict.value] += 1
            if part.verdict == Verdict.NO_VERDICT:
                s.by_reason[part.reason.label] = s.by_reason.get(part.reason.label, 0) + 1
            if part.reason in (Reason.OK, Reason.ANOMALY):
                for stage in s.stages:
                    s.stages[stage].append(getattr(part.times, stage))

    # -- calibration and control ---------------------------------------------------------------------------
    def _apply_calibration(self, calibration: Calibration, authorised: Authorised | None = None) -> None:
        """Put ``calibration`` in force (worker thread, between parts, or before the line runs)."""
        for name, recipe in calibration.recipes.items():
            self.inspector.recipes[name].threshold = recipe.threshold
        self.reject_timing = self._clock.timing = calibration.reject_timing
        self.dry_run = self.config.line.dry_run or calibration.dry_run
        self.calibration_version = str(calibration.version)
        if authorised is not None:
            self.in_force = authorised
        if getattr(self, "link", None) is not None:   # None before the link opens (the start-up calibration)
            self.link.set_calibration_version(self.calibration_version)

    def _run_tasks(self) -> None:
        """Run queued control changes (worker thread, between two parts)."""
        while True:
            try:
                task, done, box = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                box["result"] = task()
            except Exception as exc:
                box["error"] = exc
            done.set()

    def _between_parts(self, task: Callable[[], dict], timeout: float = 60.0) -> dict:
        """Have the worker run ``task`` between two parts and return its result."""
        done, box = threading.Event(), {}
        self._tasks.put((task, done, box))
        if not done.wait(timeout):
            raise ControlError(f"the line did not reach a gap between parts within {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _recipe_pool(self, request: dict):
        name = request.get("recipe", "default")
        if name not in self.inspector.recipes:
            raise ControlError(f"unknown recipe {name!r}: this line has {sorted(self.inspector.recipes)}")
        return self.inspector.recipes[name]

    def _handle_control(self, request: dict) -> dict:
        """Control-socket requests, by command name (``runtime/commands.py``; protocol in ``control.py``)."""
        handlers = {commands.STATUS: lambda _: self.control_status(), commands.POOL_INSPECT: self._pool_inspect,
                    commands.POOL_SCORES: self._pool_scores, commands.APPLY: self._apply,
                    commands.POOL_PURGE: self._pool_change, commands.POOL_FREEZE: self._pool_change,
                    commands.POOL_UNFREEZE: self._pool_change, commands.POOL_RESEED: self._pool_reseed,
                    commands.TEST_FIRE: self._test_fire, commands.AUDIT_APPEND: self._audit_append}
        handler = handlers.get(request["cmd"])
        if handler is None:
            raise ControlError(f"unknown command {request['cmd']!r}")
        return handler(request)

    def _pool_inspect(self, request: dict) -> dict:
        rp = self._recipe_pool(request)
        pool = rp.pool
        return {"recipe": rp.name, "members": [
            {"slot": i, "part_id": pool.part_ids[i], "raw_score": float(pool.raw_scores[i]),
             "admitted_time": float(pool.admitted_time[i]), "golden": bool(pool.golden[i])}
            for i in range(pool.size)]}

    def _pool_scores(self, request: dict) -> dict:
        """Leave-one-out scores of a pool, never computed on the scoring thread: the worker only copies the
        pool's scores and re-scoring features between two parts (microseconds); this control thread scores
        them at idle priority, one request at a time, and a result younger than ``LOO_REUSE_S`` is reused, so
        any number of operators asking costs the line at most one computation in that time."""
        rp = self._recipe_pool(request)
        with self._loo_lock:
            cached = self._loo_cache.get(rp.name)
            if cached is not None and time.monotonic() - cached[0] < LOO_REUSE_S:
                return {"recipe": rp.name, "threshold": rp.threshold, "scores": cached[1], "reused": True}
            raw, features = self._between_parts(lambda: (rp.pool.raw_scores[:rp.pool.size].copy(),
                                                         rp.pool.features[:rp.pool.size].copy()))
            idle_this_thread()   # this connection's own thread: the line's threads pre-empt it at once
            try:
                scores = leave_one_out_scores(raw, features, self.inspector.params)
            except PoolTooSmallError as exc:
                raise ControlError(f"PoolTooSmallError: {exc}") from None
            self._loo_cache[rp.name] = (time.monotonic(), scores)
        return {"recipe": rp.name, "threshold": rp.threshold, "scores": scores, "reused": False}

    def _apply(self, request: dict) -> dict:
        """Put an audited calibration in force between two parts: checked, written to current.json and
        recorded by the runtime itself (:meth:`CalibrationAuthority.put_in_force`), then swapped in."""
        try:
            calibration = parse_calibration(request.get("calibration") or {}, set(self.config.recipes))
        except CalibrationError as exc:
            raise ControlError(str(exc)) from None

        def apply() -> dict:
            try:
                authorised = self.authority.put_in_force(calibration, self.in_force, self.config.line.name)
            except (CalibrationError, StoreError, OSError, AuditError) as exc:
                raise ControlError(f"apply refused: {exc}") from None
            self._apply_calibration(calibration, authorised)
            return {"version": calibration.version}
        return self._between_parts(apply)

    def _audit_append(self, request: dict) -> dict:
        """Append a technician client's audit record with the line's device secret (a client that cannot
        read the secret itself). The client holds the calibration lock; the runtime serialises its writers."""
        record = request.get("record")
        if not isinstance(record, dict):
            raise ControlError("audit_append needs a 'record' object")
        try:
            return {"record": self.authority.append_for_client(record)}
        except (AuditError, OSError) as exc:
            raise ControlError(f"audit record refused: {exc}") from None

    def _pool_change(self, request: dict) -> dict:
        """Purge, freeze or unfreeze the members the request selects (:func:`commands.select_members`)."""
        cmd, rp = request["cmd"], self._recipe_pool(request)

        def change() -> dict:
            pool = rp.pool
            try:
                slots = commands.select_members(pool.part_ids, pool.raw_scores, pool.golden, request)
            except commands.SelectionError as exc:
                raise ControlError(str(exc)) from None
            if cmd == commands.POOL_PURGE:
                golden = [pool.part_ids[i] for i in slots if pool.golden[i]]
                if golden and not request.get("include_golden"):
                    raise ControlError(f"golden members are never purged implicitly: {golden}; "
                                       f"unfreeze them first")
                pool.remove(slots)
            else:
                pool.golden[slots] = cmd == commands.POOL_FREEZE
            self._persist.put(self.inspector.snapshot_pools())  # in order, by the writer thread
            return {"changed": int(len(slots)), "size": pool.size, "golden": int(pool.golden[:pool.size].sum())}
        return self._between_parts(change)

    def _pool_reseed(self, request: dict) -> dict:
        rp = self._recipe_pool(request)
        try:   # read and prepared off the worker, before the pool changes: a bad folder leaves it as it is
            prepared = rp.read_seed(request.get("folder", ""))
        except (ValueError, OSError) as exc:
            raise ControlError(f"reseed refused, the pool is unchanged: {exc}") from None

        def reseed() -> dict:
            size = rp.seed(prepared, replace=True)
            self._persist.put(self.inspector.snapshot_pools())  # in order, by the writer thread
            return {"size": size}
        return self._between_parts(reseed)

    def _test_fire(self, request: dict) -> dict:
        try:
            part_id = require_part_id(request.get("part_id") or f"TEST-{int(time.time())}")
        except PartFieldError as exc:
            raise ControlError(f"test fire refused: {exc}") from None
        if request.get("recipe", "default") not in self.inspector.recipes:
            raise ControlError(f"test fire refused: unknown recipe {str(request.get('recipe'))[:80]!r}")
        part = PartRecord(part_id=part_id, recipe=request.get("recipe", "default"), capture_time=time.time(),
                          test_part=True)
        part.decide(Verdict.REJECT, Reason.TEST_FIRE, "technician test fire")
        part.deadline = time.monotonic() + self._deadline_s
        done = threading.Event()
        self._waiters[id(part)] = done
        self._out.put(("part", part, None))
        if not done.wait(30):
            raise ControlError("the test fire was queued but not signalled within 30 s")
        return {"part_id": part_id, "seq": part.seq, "acked": part.acked}

    def control_status(self) -> dict:
        """What `musc-calibrate status` shows of a running line."""
        recipes = {}
        now = time.time()
        for name, rp in self.inspector.recipes.items():
            pool = rp.pool
            times = pool.admitted_time[:pool.size]
            recipes[name] = {"threshold": rp.threshold, "pool": {
                "size": pool.size, "capacity": pool.capacity, "min_size": pool.min_size,
                "golden": int(pool.golden[:pool.size].sum()),
                "oldest_age_s": float(now - times.min()) if pool.size else None,
                "newest_age_s": float(now - times.max()) if pool.size else None,
                "raw_scores": [float(x) for x in pool.raw_scores[:pool.size]]}}
        with self._stats_lock:
            stats = {"parts": self.stats.parts, "by_verdict": dict(self.stats.by_verdict),
                     "by_reason": dict(self.stats.by_reason), "acked": self.stats.acked,
                     "latency_ms": self.stats.percentiles(self.stats.stages["total"]),
                     "alarms": list(self.stats.alarms)[-10:]}
        link = None
        if self.link is not None:
            from dataclasses import asdict

            link = asdict(self.link.health())
        return {"line": self.config.line.name, "calibration_version": self.calibration_version,
                "dry_run": self.dry_run, "reject_timing": None if self.reject_timing is None
                else self.reject_timing.model_dump(), "recipes": recipes, "stats": stats, "link": link,
                "queue_depth": self._in.qsize(), "storage": str(self.storage)}

    def ledger_rows(self) -> list:
        """Every ledger row, read through a separate read-only connection."""
        reader = Ledger.open_readonly(self.storage / "ledger.sqlite")
        try:
            return list(reader.iter_rows())
        finally:
            reader.close()

    # -- status ----------------------------------------------------------------------------------------------
    def status_line(self) -> str:
        with self._stats_lock:
            s = self.stats
            lat = s.percentiles(s.stages["total"])
            nv = " ".join(f"{k}={v}" for k, v in sorted(s.by_reason.items()))
            text = (f"parts {s.parts:>5} | OK {s.by_verdict['ACCEPT']:>4} NG {s.by_verdict['REJECT']:>4} "
                    f"NV {s.by_verdict['NO_VERDICT']:>3}{' (' + nv + ')' if nv else ''} | "
                    f"acked {s.acked:>5}")
        pools = " ".join(f"{name} {rp.pool.size}/{rp.pool.capacity}" for name, rp in self.inspector.recipes.items())
        link = ""
        if self.link is not None:
            h = self.link.health()
            link = f" | link {'up' if h.connected else 'DOWN'} outbox {h.outbox_depth}"
        latency = f" | p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms" if lat else ""
        return f"{text}{link} | pool {pools}{latency}"

    def _status_loop(self) -> None:
        while not self._stop.wait(self._status_every):
            if self._status:
                try:
                    self._status(self.status_line())
                except Exception:   # the status display is not worth a thread restart storm
                    log.debug("status line failed", exc_info=True)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
