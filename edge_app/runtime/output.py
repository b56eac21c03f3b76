"""The output stage, on the line's output thread: the fail-safe policy, the ledger row (durable; its row id is the
wire sequence number), *then* the PLC within the part's deadline, acks (also late ones, reported by the link),
the reject archive and telemetry. It is the only writer of the ledger, and it owns the reject link: a link
whose worker stopped is opened again and handed every verdict not yet acknowledged."""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from ..archive import RejectArchive
from ..config import LineConfig
from ..ledger import Ledger
from ..links import RejectLink, open_link
from ..record import FailSafe, PartRecord, Reason, Verdict
from ..sources.fields import check_part_fields, quarantine
from ..telemetry import Telemetry
from .faults import THREAD_FAULT_WINDOW_S, LineStopped, one_line
from .in_force import InForce
from .live_status import LineStats
from .messages import END, Ack, Decided, End

log = logging.getLogger(__name__)
LINK_RESTARTS = 3   # a reject link that stops this often within THREAD_FAULT_WINDOW_S stops the line


def signalled_verdict(part: PartRecord, fail_safe: FailSafe) -> Verdict:
    """What goes to the PLC: the verdict itself, or the fail-safe action when there is none."""
    if part.verdict in (Verdict.ACCEPT, Verdict.REJECT):
        return part.verdict
    return Verdict.ACCEPT if fail_safe == FailSafe.PASS_FLAGGED else Verdict.REJECT


class OutputStage:
    """Every decided part, in the order it comes, to the ledger, the PLC, the archive and telemetry."""

    def __init__(self, config: LineConfig, storage: Path, *, stats: LineStats, telemetry: Telemetry,
                 in_force: Callable[[], InForce], model_hash: Callable[[], str],
                 on_alarm: Callable[[str], None], fatal_fault: Callable[[str], None], stopping: threading.Event):
        self.config, self.storage, self.stats, self.telemetry = config, storage, stats, telemetry
        self._in_force, self._model_hash, self._on_alarm, self._fatal_fault = in_force, model_hash, on_alarm, fatal_fault
        self._stopping = stopping
        self.config_hash = config.config_hash()
        self.queue: queue.Queue[Decided | End] = queue.Queue()
        self._acks: queue.Queue[Ack] = queue.Queue()
        self._waiters: dict[int, threading.Event] = {}
        self._link_restarts: deque = deque(maxlen=LINK_RESTARTS)
        self.ledger: Ledger | None = None
        self.link: RejectLink | None = None
        self.archive: RejectArchive | None = None

    def open(self, ledger: Ledger) -> None:
        """Start writing ``ledger``, archiving rejects (storage.archive) and signalling on a new reject link."""
        self.ledger = ledger
        # The link is up even in dry-run: dry-run is a calibration switch that can change while running,
        # and heartbeats and test fires still go out.
        self.link = self._open_link()
        archive = self.config.storage.archive
        if archive.enabled:
            self.archive = RejectArchive(self.storage / "archive", int(archive.quota_mb * 2**20),
                                         accepted_fraction=archive.sample_accepted, no_verdict_fraction=1.0,
                                         image_format=archive.image_format,
                                         min_free_fraction=archive.min_free_percent / 100, on_alarm=self._on_alarm)

    def put(self, part: PartRecord, in_force: InForce | None = None) -> None:
        self.queue.put(Decided(part, in_force))

    def end(self) -> None:
        self.queue.put(END)

    def signal_and_wait(self, part: PartRecord, timeout: float) -> bool:
        """Queue ``part`` and wait until it is recorded and signalled (a test fire); False after ``timeout``."""
        done = threading.Event()
        self._waiters[id(part)] = done
        self.put(part)
        return done.wait(timeout)

    def run(self, fatal: Callable[[], str | None]) -> None:
        """Emit parts until the end of the stream; ``LineStopped`` when the ledger cannot be written or
        ``fatal()`` names a fault the line could not survive."""
        try:
            while True:
                try:
                    item = self.queue.get(timeout=0.1)
                except queue.Empty:
                    self.drain_acks()
                    self._check_link()
                    continue
                if isinstance(item, End):
                    if fatal() is not None:
                        raise LineStopped(fatal())
                    return
                self._check_link()   # also under a steady flow of parts (the idle check above may never run)
                try:
                    self._emit(item.part, item.in_force)
                except (LineStopped, sqlite3.Error):
                    raise
                except Exception as exc:   # a fault of this part's signal, archive or telemetry: it, not the line
                    self._output_fault(item.part, exc)
        except sqlite3.Error as exc:  # an ack or link time that cannot be recorded (disk full, I/O error)
            self._on_alarm(f"ledger update failed, line stopping: {exc}")
            raise LineStopped(f"the ledger {self.ledger.path} cannot be updated ({exc}); unacknowledged "
                              "verdicts are re-sent at the next start") from None

    def close(self) -> None:
        """Let the link's outbox drain (2 s at most), record the last acks, close link, archive and ledger."""
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

    # -- the reject link -------------------------------------------------------------------------------------
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
        link.set_calibration_version(self._in_force().version)   # shown with each verdict by Modbus / OPC UA
        return link

    def _check_link(self) -> None:
        """A reject link whose worker stopped (a fault it could not survive) is replaced by a new one, which
        re-sends every unacknowledged verdict. A link that stops ``LINK_RESTARTS`` times within
        ``THREAD_FAULT_WINDOW_S`` stops the line (non-zero exit; systemd starts it afresh)."""
        if self.link is None or self.link.worker_alive or self._stopping.is_set():
            return
        alarms = one_line("; ".join(self.link.health().alarms) or "no alarm")
        self._link_restarts.append(time.monotonic())
        if len(self._link_restarts) == LINK_RESTARTS and \
                self._link_restarts[-1] - self._link_restarts[0] < THREAD_FAULT_WINDOW_S:
            self._fatal_fault(f"the {self.config.link.type} reject link stopped {LINK_RESTARTS} times within "
                              f"{THREAD_FAULT_WINDOW_S:.0f} s ({alarms})")
            return
        self._on_alarm(f"the {self.config.link.type} reject link stopped ({alarms}); opening it again")
        self.link.close()
        self.link = self._open_link()

    # -- one part --------------------------------------------------------------------------------------------
    def _emit(self, part: PartRecord, in_force: InForce | None = None) -> None:
        """Ledger first (durable), then the PLC, then the archive. No error of one part leaves here,
        except a ledger that cannot be written (LineStopped): then nothing may be signalled at all."""
        if in_force is None:  # decided outside the worker (overload, test fire): the calibration in force now
            in_force = self._in_force()
        check_part_fields(part)  # the last line of defence: whatever created it, it must fit the ledger and wire
        fail_safe = self.config.line.fail_safe
        part.signalled = signalled_verdict(part, fail_safe)
        dry_run = in_force.dry_run and not part.test_part
        part.times.total = time.monotonic() - part.capture_monotonic

        def record() -> int:
            return self.ledger.reserve(part, model_hash=self._model_hash(), config_hash=self.config_hash,
                                       calibration_version=in_force.version, dry_run=dry_run)
        try:
            try:
                seq = record()
            except (ValueError, TypeError, OverflowError) as exc:  # the part's content, not the storage
                self._on_alarm(f"part {part.part_id[:80]!r} could not be recorded as it came: {exc}")
                quarantine(part, f"{type(exc).__name__}: {exc}")
                part.signalled = signalled_verdict(part, fail_safe)
                seq = record()
        except Exception as exc:
            # Without a durable row nothing may be signalled: stop, and let the PLC's inspect window
            # reject every part that gets no verdict (the documented fail-safe of the wire protocol).
            self._on_alarm(f"ledger write failed, line stopping: {exc}")
            raise LineStopped(f"the ledger {self.ledger.path} cannot be written ({exc}); the line stopped "
                              f"before part {part.part_id}, nothing signalled was lost") from None
        if self.link is not None and not dry_run:
            self._signal(seq, part)
        waiter = self._waiters.pop(id(part), None)
        if waiter is not None:
            waiter.set()
        self.drain_acks()
        if self.archive is not None and not part.test_part:
            self.archive.submit(part)
        self.stats.count(part)
        self.telemetry.part(part, in_force.version)
        if part.verdict == Verdict.NO_VERDICT and fail_safe == FailSafe.STOP_LINE \
                and part.reason != Reason.WARMUP:   # warm-up parts are rejected; the pool is not ready yet
            reason = f"no verdict: part {part.part_id} ({part.reason.label})"
            self._on_alarm(f"line stop requested: {reason}")
            if self.link is not None:
                self.link.send_stop_line(reason)
        part.image = part.raw = None  # free the frame; the ledger and archive have what they need

    def _signal(self, seq: int, part: PartRecord) -> None:
        """Send row ``seq``'s verdict to the PLC within the part's deadline; the link time goes in the row."""
        deadline = part.deadline or part.capture_monotonic + self.config.line.deadline_ms / 1e3
        t0 = time.monotonic()
        try:
            result = self.link.send(seq, part.part_id, part.signalled, part.reason, max(deadline, t0 + 0.05))
        except ValueError as exc:  # a field the wire refuses (check_part_fields should have caught it)
            self._unsendable(seq, part.part_id, str(exc))
            result = None
        except Exception as exc:   # a link fault: the row stays unacknowledged and is re-sent at the next start
            log.exception("link send failed for seq %s", seq)
            self._on_alarm(f"verdict seq {seq} (part {part.part_id[:80]!r}) not sent: {type(exc).__name__}: "
                           f"{one_line(exc)}")
            result = None
        part.times.link = time.monotonic() - t0
        part.times.total = time.monotonic() - part.capture_monotonic
        self.ledger.update_link_time(seq, part.times.link, total=part.times.total)
        if result is None or not result.acked:
            self.stats.count_send_failure()
        part.acked = result is not None and result.acked

    def _output_fault(self, part: PartRecord, exc: Exception) -> None:
        """After a fault in ``_emit``: a part without a ledger row is recorded NO_VERDICT (engine_error) once
        more; one with a row keeps it (unacknowledged, it is re-sent at the next start)."""
        log.exception("output stage failed for part %s", getattr(part, "part_id", "?"))
        self._on_alarm(f"output stage failed for part {str(part.part_id)[:80]!r} (seq {part.seq}): "
                       f"{type(exc).__name__}: {one_line(exc)}")
        if part.seq is None:
            part.decide(Verdict.NO_VERDICT, Reason.ENGINE_ERROR, f"output stage failed: {one_line(exc)}"[:500])
            try:
                self._emit(part)
            except (LineStopped, sqlite3.Error):
                raise
            except Exception as again:
                self._on_alarm(f"part {str(part.part_id)[:80]!r} could not be recorded: {one_line(again)}")
        waiter = self._waiters.pop(id(part), None)
        if waiter is not None:
            waiter.set()

    def _unsendable(self, seq: int, part_id: str, why: str) -> None:
        """A row whose signal can never go out: marked in the ledger (never re-sent) and alarmed."""
        self.ledger.mark_unsendable(seq, why)
        self._on_alarm(f"verdict seq {seq} (part {part_id[:80]!r}) can never be sent: {why[:200]}")

    # -- acknowledgements ------------------------------------------------------------------------------------
    def _on_ack(self, seq: int, late: bool) -> None:
        # Runs on the link's thread: only the output thread writes the ledger, so hand the ack over.
        self._acks.put(Ack(seq, late, time.time()))

    def drain_acks(self) -> None:
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                return
            self.ledger.mark_acked(ack.seq, late=ack.late, when=ack.when)
            self.telemetry.ack(ack.seq, ack.late)
            self.stats.count_ack(ack.late)

    def _drain_acks_or_alarm(self) -> None:
        try:
            self.drain_acks()
        except sqlite3.Error as exc:  # shutting down anyway: the unrecorded acks mean re-sends next start
            self._on_alarm(f"acknowledgements could not be recorded: {exc}")
