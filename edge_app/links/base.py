"""The reject link: verdicts to the PLC with acks, an ordered outbox, retries, heartbeats and health.

One :class:`RejectLink` drives any :class:`Transport` (serial, ZeroMQ). A single background worker
owns the transport and talks stop-and-wait: one message in flight, the outbox delivered strictly in
sequence order, heartbeats in between; every message carries the line epoch, which the PLC
acknowledges (EPOCH) before the first verdict after each (re)connection. Callers block in :meth:`RejectLink.send` at most until their
deadline; anything not acked by then stays in the outbox and is delivered later (``on_ack`` with
``late=True``), so nothing is lost and, with the PLC de-duplicating by (epoch, ``seq``), nothing is doubled.
"""
from __future__ import annotations

import bisect
import logging
import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from pydantic import Field, model_validator

from musc_edge.edge.links.framing import (
    MAX_EPOCH,
    MAX_SEQ,
    Frame,
    FrameError,
    MessageType,
    NakCode,
    VerdictFlags,
    decode_body,
    encode_body,
    epoch_frame,
    heartbeat_frame,
    reply_target,
    stop_line_frame,
    verdict_frame,
)
from musc_edge.edge.record import Reason, Verdict
from musc_edge.edge.strict_model import MAX_DURATION_S, StrictModel

log = logging.getLogger(__name__)

AckCallback = Callable[[int, bool], None]
AlarmCallback = Callable[[str], None]

MAX_ACK_TIMEOUT_S = 60.0   # a reply later than a minute is no reply: the verdict goes on through the outbox
ALARM_LINK_DOWN = "link_down"
ALARM_PLC_SILENT = "plc_silent"
ALARM_PLC_REFUSING = "plc_refusing"
ALARM_WORKER_FAILED = "worker_failed"
ALARM_FOREIGN_WRITER = "foreign_writer"     # a client other than the PLC tried to write acknowledgements


class LinkIOError(OSError):
    """The transport broke (device gone, socket closed); the link reopens it with backoff."""


class LinkClosedError(RuntimeError):
    """The link was used after :meth:`RejectLink.close`."""


class LinkSettings(StrictModel):
    """Timing shared by every transport (config keys of the ``link`` section); every number finite and
    bounded (edge_app/strict_model.py): no timeout that never ends, no heartbeat that busy-loops."""

    ack_timeout_s: float = Field(0.05, gt=0, le=MAX_ACK_TIMEOUT_S, description="wait for an ACK/NAK per transmission")
    max_attempts: int = Field(5, ge=1, le=1000, description="transmissions per verdict before its deadline")
    backoff_initial_s: float = Field(0.1, gt=0, le=600, description="first pause between late re-deliveries")
    backoff_max_s: float = Field(2.0, gt=0, le=3600, description="longest pause between late re-deliveries")
    heartbeat_interval_s: float = Field(1.0, ge=0.01, le=3600, description="period of HEARTBEAT messages")
    silence_alarm_s: float = Field(3.0, gt=0, le=MAX_DURATION_S, description=(
        "PLC silent this long -> plc_silent alarm"))

    @model_validator(mode="after")
    def _consistent(self) -> LinkSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s={self.backoff_max_s} is below "
                             f"backoff_initial_s={self.backoff_initial_s}")
        if self.silence_alarm_s <= self.heartbeat_interval_s:
            raise ValueError(f"silence_alarm_s={self.silence_alarm_s} must exceed "
                             f"heartbeat_interval_s={self.heartbeat_interval_s}")
        return self


class Transport(ABC):
    """Moves message bodies (see framing.py) to and from the PLC. Used by one thread at a time.

    Every link type implements five primitives: ``open``, ``close``, ``write`` and ``read`` of message
    bodies, and ``send_stop_line(reason)``: tell the PLC to stop the conveyor now (``fail_safe: stop_line``).
    A framed transport writes a STOP_LINE body (``framing.stop_line_frame(0, reason)``, seq 0), which the
    PLC acknowledges like any message; a transport with its own data model (a Modbus coil, an OPC UA
    variable) sets its stop signal there and returns True once it is written. It is repeated until
    acknowledged, so it must be idempotent.

    ``line_epoch`` is set by the link before ``open``: framed transports put it in the STOP_LINE they build.
    A transport that can tell who writes (a Modbus/TCP server, an OPC UA server) reports a refused writer
    through the alarm callbacks :meth:`bind_alarms` gives it.
    """

    description: str
    line_epoch: int = 0

    def bind_alarms(self, raise_alarm: Callable[[str, str], None], clear_alarm: Callable[[str, str], None]) -> None:
        """Receive the link's ``raise_alarm(key, text)`` / ``clear_alarm(key, text)``; the default ignores them."""

    @abstractmethod
    def open(self) -> None:
        """Open the connection; LinkIOError to retry later, ValueError for a bad configuration."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; safe to call when not open."""

    @abstractmethod
    def write(self, body: bytes) -> bool:
        """Transmit one body; False when the PLC cannot be reached right now (counts as a failed try)."""

    @abstractmethod
    def read(self, timeout_s: float) -> list[bytes | FrameError]:
        """Bodies received within ``timeout_s`` (returns as soon as any arrive); [] on timeout."""

    @abstractmethod
    def send_stop_line(self, reason: str) -> bool:
        """Transmit the line-stop request with ``reason`` (see the class docstring); False when the PLC
        cannot be reached right now (counts as a failed try); LinkIOError when the transport broke."""


@dataclass(frozen=True)
class SendResult:
    acked: bool
    attempts: int
    latency_s: float
    error: str | None = None


@dataclass(frozen=True)
class LinkHealth:
    connected: bool                   # transport open and the PLC answered within silence_alarm_s
    last_ack_age_s: float | None      # since the last ACK of a verdict or heartbeat; None if none yet
    consecutive_failures: int         # exchanges without an ACK since the last ACK
    alarms: tuple[str, ...]           # active alarm texts
    outbox_depth: int                 # verdicts waiting for an ACK
    transmissions: int = 0
    retries: int = 0
    acked: int = 0
    late_acks: int = 0
    naks: int = 0
    bad_frames: int = 0               # replies that failed CRC or framing
    heartbeats_sent: int = 0
    heartbeats_acked: int = 0
    stop_lines_sent: int = 0          # STOP_LINE transmissions
    stop_lines_acked: int = 0         # line stops the PLC acknowledged
    epoch: int = 0                    # the line epoch every message carries
    epoch_acked: bool = False         # the PLC acknowledged it on the current connection


@dataclass(frozen=True)
class _Outcome:
    """How one exchange ended."""

    acked: bool
    error: str | None = None
    refused: bool = False             # the PLC answered with a NAK


@dataclass(eq=False)
class _Outgoing:
    seq: int                          # the caller's (ledger) seq; the wire carries it modulo 2**32
    frame: Frame
    deadline: float
    resend: bool
    enqueued: float
    next_due: float
    backoff: float
    attempts: int = 0
    refusals: int = 0                 # NAKs in a row
    acked: bool = False
    acked_at: float = 0.0
    abandoned: bool = False           # the sender stopped waiting: an ACK now is late
    last_error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Counters:
    transmissions: int = 0
    retries: int = 0
    acked: int = 0
    late_acks: int = 0
    naks: int = 0
    bad_frames: int = 0
    heartbeats_sent: int = 0
    heartbeats_acked: int = 0
    stop_lines_sent: int = 0
    stop_lines_acked: int = 0
    epoch_refusals: int = 0


def new_line_epoch() -> int:
    """A random non-zero 32-bit line epoch."""
    return secrets.randbelow(MAX_EPOCH) + 1


class RejectLink:
    """Reliable, ordered verdict delivery over one transport. Thread-safe; use as a context manager.

    ``on_ack(seq, late)`` is called once per acknowledged verdict (``late`` when its sender had
    already stopped waiting, or for :meth:`resend`); ``on_alarm(text)`` when an alarm is raised and
    ``on_alarm_cleared(text)`` when it clears. Callbacks run on the link's worker thread and must
    return quickly.

    ``epoch`` is the line epoch (the ledger's, :attr:`musc_edge.edge.ledger.Ledger.line_epoch`); every message
    carries it and no verdict goes out on a connection before the PLC acknowledged it. None: a random one
    (fine for tests; a line passes its ledger's, so that a restart keeps it).
    """

    def __init__(self, transport: Transport, settings: LinkSettings | None = None, *,
                 on_ack: AckCallback | None = None, on_alarm: AlarmCallback | None = None,
                 on_alarm_cleared: AlarmCallback | None = None, epoch: int | None = None) -> None:
        if epoch is None:
            epoch = new_line_epoch()
        if not isinstance(epoch, int) or not 1 <= epoch <= MAX_EPOCH:
            raise ValueError(f"line epoch {epoch!r} must be an int in 1..{MAX_EPOCH}")
        self._epoch = epoch
        transport.line_epoch = epoch
        self._transport = transport
        self._settings = settings or LinkSettings()
        self._on_ack, self._on_alarm, self._on_alarm_cleared = on_ack, on_alarm, on_alarm_cleared
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._outbox: list[_Outgoing] = []          # sorted by seq
        self._pending: dict[int, _Outgoing] = {}
        self._alarms: dict[str, str] = {}
        self._counters = _Counters()
        self._closing = False
        now = time.monotonic()
        self._last_rx = now                          # grace period: silence counts from start
        self._last_heard: float | None = None       # last valid frame from the PLC
        self._last_ack: float | None = None
        self._consecutive_failures = 0
        self._heartbeat_counter = 0
        self._heartbeat_due = now
        self._reopen_backoff = self._settings.backoff_initial_s
        self._reopen_at = now
        self._open = False
        self._stop_reason: str | None = None        # a line stop waiting for the PLC's ACK
        self._stop_due = now
        self._stop_backoff = self._settings.backoff_initial_s
        self._epoch_acked = False                   # per connection: announced and acknowledged
        self._epoch_due = now
        self._epoch_backoff = self._settings.backoff_initial_s
        self._epoch_attempts = 0
        transport.bind_alarms(self._raise_alarm, self._clear_alarm)
        self._try_open()
        self._worker = threading.Thread(target=self._run, name=f"reject-link {transport.description}",
                                        daemon=True)
        self._worker.start()

    # ----------------------------------------------------------------------------- public API

    def send(self, seq: int, part_id: str, verdict: Verdict, reason: Reason,
             deadline_monotonic: float) -> SendResult:
        """Queue a verdict and block until it is acked or ``deadline_monotonic`` passes.

        ``seq`` is the ledger row id (increasing, persistent); the wire carries it modulo 2**32.

        Not acked by the deadline: the verdict stays queued, is re-delivered in order, and its
        eventual ACK is reported via ``on_ack(seq, late=True)``. Raises ValueError for a field that
        does not fit the wire format or a ``seq`` already waiting, LinkClosedError after close().
        """
        start = time.monotonic()
        message = self._enqueue(seq, part_id, verdict, reason, deadline_monotonic, resend=False)
        message.done.wait(max(0.0, deadline_monotonic - start))
        with self._lock:
            if not message.acked:
                message.abandoned = True
            acked, attempts, error = message.acked, message.attempts, message.last_error
        if acked:
            return SendResult(True, attempts, message.acked_at - start)
        if error is None:
            error = "deadline passed before the first transmission"
        return SendResult(False, attempts, time.monotonic() - start, f"not acked by the deadline: {error}")

    def resend(self, seq: int, part_id: str, verdict: Verdict, reason: Reason) -> None:
        """Queue a verdict the ledger says was never acked (after a restart); returns at once.

        Delivered in seq order with the RESEND flag; its ACK is reported via ``on_ack(seq, True)``.
        A ``seq`` already waiting is left as it is. Call it for every unacked row *before* the
        first :meth:`send` after a restart, so the PLC sees seqs in increasing order.
        """
        self._enqueue(seq, part_id, verdict, reason, time.monotonic(), resend=True)

    def send_stop_line(self, reason: str) -> None:
        """Ask the PLC to stop the line (STOP_LINE), ahead of any verdict; returns at once.

        Repeated with backoff until the PLC acknowledges it (``health().stop_lines_acked``); a newer
        request replaces a pending one's reason.
        """
        with self._lock:
            if self._closing:
                raise LinkClosedError(f"reject link {self._transport.description} is closed")
            self._stop_reason = str(reason) or "stop requested"
            self._stop_due = time.monotonic()
            self._stop_backoff = self._settings.backoff_initial_s
            self._wake.notify()

    @property
    def epoch(self) -> int:
        """The line epoch every message carries."""
        return self._epoch

    @property
    def worker_alive(self) -> bool:
        """Whether the link's worker thread runs: False once closed, or after a fault stopped it (alarmed as
        ``worker_failed``); a line then cannot signal and must stop."""
        return self._worker.is_alive()

    def set_calibration_version(self, version: str | int) -> None:
        """Show ``version`` with the verdicts published from now on. Framed links carry none (the ledger has
        it); links whose PLC reads a data model (Modbus, OPC UA: ``PlantLink``) override this."""

    def health(self) -> LinkHealth:
        """A consistent snapshot of the link's state and counters."""
        now = time.monotonic()
        with self._lock:
            c = self._counters
            return LinkHealth(
                connected=self._open and self._last_heard is not None
                and now - self._last_heard <= self._settings.silence_alarm_s,
                last_ack_age_s=None if self._last_ack is None else now - self._last_ack,
                consecutive_failures=self._consecutive_failures,
                alarms=tuple(self._alarms.values()),
                outbox_depth=len(self._outbox),
                transmissions=c.transmissions, retries=c.retries, acked=c.acked,
                late_acks=c.late_acks, naks=c.naks, bad_frames=c.bad_frames,
                heartbeats_sent=c.heartbeats_sent, heartbeats_acked=c.heartbeats_acked,
                stop_lines_sent=c.stop_lines_sent, stop_lines_acked=c.stop_lines_acked,
                epoch=self._epoch, epoch_acked=self._open and self._epoch_acked,
            )

    def close(self) -> None:
        """Stop the worker (within about ack_timeout_s) and release the transport.

        Verdicts still in the outbox are dropped from memory; the ledger knows them as not acked
        and the runtime re-sends them with :meth:`resend` after a restart.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            for message in self._outbox:
                message.last_error = message.last_error or "link closed"
                message.done.set()
            self._wake.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join()

    def __enter__(self) -> RejectLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- queueing

    def _enqueue(self, seq: int, part_id: str, verdict: Verdict, reason: Reason, deadline: float,
                 resend: bool) -> _Outgoing:
        if not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq {seq!r} must be a non-negative int")
        frame = verdict_frame(seq & MAX_SEQ, part_id, verdict, reason, epoch=self._epoch)
        now = time.monotonic()
        message = _Outgoing(seq, frame, deadline, resend, enqueued=now, next_due=now,
                            backoff=self._settings.backoff_initial_s, abandoned=resend)
        with self._lock:
            if self._closing:
                raise LinkClosedError(f"reject link {self._transport.description} is closed")
            if seq in self._pending:
                if resend:
                    return self._pending[seq]
                raise ValueError(f"seq {seq} is already waiting for an ACK")
            bisect.insort(self._outbox, message, key=lambda m: m.seq)
            self._pending[seq] = message
            self._outbox[0].next_due = min(self._outbox[0].next_due, now)   # new traffic probes the PLC
            if not self._epoch_acked:                                       # ... and the epoch first
                self._epoch_due, self._epoch_attempts = min(self._epoch_due, now), 0
            self._wake.notify()
        return message

    # ----------------------------------------------------------------------------- worker

    def _run(self) -> None:
        try:
            while (job := self._next_job()) is not None:
                job()
        except Exception as exc:
            self._raise_alarm(ALARM_WORKER_FAILED, f"reject link worker stopped: {exc!r}")
            self.close()
            raise
        finally:
            self._transport.close()

    def _next_job(self) -> Callable[[], None] | None:
        """Sleep until something is due; the job to run, or None when closing."""
        silence_s = self._settings.silence_alarm_s
        with self._lock:
            while not self._closing:
                now = time.monotonic()
                if self._silence_alarm_due(now):
                    return self._raise_silence_alarm
                if not self._open:
                    job, due = self._try_open, self._reopen_at
                elif self._stop_reason is not None and self._stop_due <= now:
                    job, due = self._deliver_stop_line, self._stop_due
                elif not self._epoch_acked:                 # nothing else before the PLC knows the epoch
                    job, due = self._announce_epoch, self._epoch_due
                elif self._outbox and self._outbox[0].next_due <= self._heartbeat_due:
                    job, due = self._deliver_head, self._outbox[0].next_due
                else:
                    job, due = self._heartbeat, self._heartbeat_due
                if due <= now:
                    return job
                if self._stop_reason is not None:
                    due = min(due, self._stop_due)
                if ALARM_PLC_SILENT not in self._alarms:
                    due = min(due, self._last_rx + silence_s)
                self._wake.wait(due - now)
            return None

    def _deliver_head(self) -> None:
        with self._lock:
            if not self._outbox:
                return
            message = self._outbox[0]
            flags = (VerdictFlags.LATE if time.monotonic() > message.deadline else 0) | \
                    (VerdictFlags.RESEND if message.resend else 0)
            if flags != message.frame.payload[0]:
                old = message.frame
                message.frame = Frame(old.type, old.seq, bytes((flags,)) + old.payload[1:], old.epoch)
            frame = message.frame
            if message.attempts:
                self._counters.retries += 1
            message.attempts += 1
        outcome = self._exchange(frame)
        now = time.monotonic()
        refused_text, late = None, False
        with self._lock:
            if outcome.acked:
                self._outbox.remove(message)
                del self._pending[message.seq]
                late = message.abandoned
                message.acked, message.acked_at = True, now
                self._counters.acked += 1
                self._counters.late_acks += late
                message.done.set()
            else:
                message.last_error = outcome.error
                message.refusals = message.refusals + 1 if outcome.refused else 0
                if message.refusals >= self._settings.max_attempts:
                    refused_text = (f"PLC refuses seq {message.seq}: {outcome.error} "
                                    f"({message.refusals} times)")
                if now < message.deadline and message.attempts < self._settings.max_attempts:
                    message.next_due = now
                else:
                    message.next_due = now + message.backoff
                    message.backoff = min(2 * message.backoff, self._settings.backoff_max_s)
        if refused_text is not None:
            self._raise_alarm(ALARM_PLC_REFUSING, refused_text)
        if outcome.acked:
            self._clear_alarm(ALARM_PLC_REFUSING, f"PLC took seq {message.seq}")
            if self._on_ack is not None:
                _call_safely(self._on_ack, message.seq, late)

    def _deliver_stop_line(self) -> None:
        with self._lock:
            reason = self._stop_reason
            if reason is None:
                return
            self._counters.stop_lines_sent += 1
        frame = stop_line_frame(0, reason, epoch=self._epoch)
        if self._exchange(frame, send=lambda: self._transport.send_stop_line(reason)).acked:
            with self._lock:
                self._counters.stop_lines_acked += 1
                if self._stop_reason == reason:
                    self._stop_reason = None
            return
        with self._lock:
            self._stop_due = time.monotonic() + self._stop_backoff
            self._stop_backoff = min(2 * self._stop_backoff, self._settings.backoff_max_s)

    def _announce_epoch(self) -> None:
        """Send EPOCH until the PLC acknowledges it (then verdicts flow); backoff between tries."""
        outcome = self._exchange(epoch_frame(self._epoch))
        refused_text = None
        with self._lock:
            if outcome.acked:
                self._epoch_acked = True
                self._epoch_attempts = 0
                self._epoch_backoff = self._settings.backoff_initial_s
                self._counters.epoch_refusals = 0
                if self._outbox:
                    self._outbox[0].next_due = time.monotonic()
            else:
                now = time.monotonic()
                self._epoch_attempts += 1
                if self._outbox and now < self._outbox[0].deadline and \
                        self._epoch_attempts < self._settings.max_attempts:
                    self._epoch_due = now                   # a verdict is waiting for it: retry at once
                else:
                    self._epoch_due = now + self._epoch_backoff
                    self._epoch_backoff = min(2 * self._epoch_backoff, self._settings.backoff_max_s)
                self._counters.epoch_refusals = self._counters.epoch_refusals + 1 if outcome.refused else 0
                if self._counters.epoch_refusals >= self._settings.max_attempts:
                    refused_text = (f"PLC refuses the line epoch {self._epoch:08X}: {outcome.error} (a PLC program "
                                    "for wire protocol 1? docs/wire-protocol.md); no verdict can be delivered")
        if refused_text is not None:
            self._raise_alarm(ALARM_PLC_REFUSING, refused_text)
        elif outcome.acked:
            self._clear_alarm(ALARM_PLC_REFUSING, f"PLC took the line epoch {self._epoch:08X}")

    def _heartbeat(self) -> None:
        with self._lock:
            self._heartbeat_counter = (self._heartbeat_counter + 1) & MAX_SEQ
            frame = heartbeat_frame(self._heartbeat_counter, len(self._outbox), epoch=self._epoch)
            self._counters.heartbeats_sent += 1
            self._heartbeat_due += self._settings.heartbeat_interval_s
            now = time.monotonic()
            if self._heartbeat_due <= now:                      # fell behind: do not burst
                self._heartbeat_due = now + self._settings.heartbeat_interval_s
        if self._exchange(frame).acked:
            with self._lock:
                self._counters.heartbeats_acked += 1
                if self._outbox:                                # the PLC is back: retry now
                    head = self._outbox[0]
                    head.next_due, head.backoff = time.monotonic(), self._settings.backoff_initial_s

    def _exchange(self, frame: Frame, send: Callable[[], bool] | None = None) -> _Outcome:
        """Transmit ``frame`` (by ``send()`` when given) and wait up to ack_timeout_s for its reply."""
        try:
            sent = send() if send is not None else self._transport.write(encode_body(frame))
            with self._lock:
                self._counters.transmissions += 1
            error = None if sent else f"PLC not reachable on {self._transport.description}"
            until = time.monotonic() + self._settings.ack_timeout_s
            while not self._closing:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                outcomes = [self._match_reply(item, frame) for item in self._transport.read(remaining)]
                answered = [outcome for outcome in outcomes if outcome is not None]
                if answered:                    # an ACK in the batch outweighs damaged frames
                    return self._record_outcome(max(answered, key=lambda outcome: outcome.acked))
        except LinkIOError as exc:
            self._transport_failed(exc)
            return self._record_outcome(_Outcome(False, str(exc)))
        timed_out = f"no reply within {self._settings.ack_timeout_s} s"
        return self._record_outcome(_Outcome(False, error or timed_out))

    def _match_reply(self, item: bytes | FrameError, sent: Frame) -> _Outcome | None:
        """The outcome if ``item`` answers ``sent``; None for a stale or unrelated frame."""
        try:
            if isinstance(item, FrameError):
                raise item
            reply = decode_body(item)
            if reply.type not in (MessageType.ACK, MessageType.NAK):
                return None
            acked_type, nak_code = reply_target(reply)
        except FrameError as exc:
            with self._lock:
                self._counters.bad_frames += 1
            return _Outcome(False, f"corrupted reply ({exc})")   # almost surely ours: retry now
        self._heard_from_plc()
        if reply.seq != sent.seq or acked_type != sent.type or reply.epoch != sent.epoch:
            return None
        if nak_code is not None:
            with self._lock:
                self._counters.naks += 1
            return _Outcome(False, f"NAK {_nak_name(nak_code)}", refused=True)
        return _Outcome(True)

    def _record_outcome(self, outcome: _Outcome) -> _Outcome:
        with self._lock:
            if outcome.acked:
                self._last_ack = time.monotonic()
                self._consecutive_failures = 0
            else:
                self._consecutive_failures += 1
        return outcome

    # ----------------------------------------------------------------------------- connection

    def _try_open(self) -> None:
        try:
            self._transport.open()
        except LinkIOError as exc:
            self._transport_failed(exc)
            return
        with self._lock:
            self._open = True
            self._reopen_backoff = self._settings.backoff_initial_s
            self._epoch_acked = False                    # announce the epoch again on every connection
            self._epoch_attempts = 0
            self._epoch_due = time.monotonic()
            self._epoch_backoff = self._settings.backoff_initial_s
        self._clear_alarm(ALARM_LINK_DOWN, f"{self._transport.description} open")

    def _transport_failed(self, exc: Exception) -> None:
        self._transport.close()
        with self._lock:
            self._open = False
            self._reopen_at = time.monotonic() + self._reopen_backoff
            self._reopen_backoff = min(2 * self._reopen_backoff, self._settings.backoff_max_s)
        self._raise_alarm(ALARM_LINK_DOWN, f"link down: {self._transport.description}: {exc}")

    # ----------------------------------------------------------------------------- alarms

    def _heard_from_plc(self) -> None:
        with self._lock:
            now = time.monotonic()
            silent_for, self._last_rx, self._last_heard = now - self._last_rx, now, now
        self._clear_alarm(ALARM_PLC_SILENT, f"PLC answering again after {silent_for:.2f} s")

    def _silence_alarm_due(self, now: float) -> bool:
        return ALARM_PLC_SILENT not in self._alarms and \
            now - self._last_rx > self._settings.silence_alarm_s

    def _raise_silence_alarm(self) -> None:
        with self._lock:
            silent_for, depth = time.monotonic() - self._last_rx, len(self._outbox)
        self._raise_alarm(ALARM_PLC_SILENT, f"PLC silent for {silent_for:.2f} s on "
                          f"{self._transport.description}; {depth} verdict(s) waiting")

    def _raise_alarm(self, key: str, text: str) -> None:
        with self._lock:
            new = key not in self._alarms
            self._alarms[key] = text
        if new and self._on_alarm is not None:
            _call_safely(self._on_alarm, text)

    def _clear_alarm(self, key: str, text: str) -> None:
        with self._lock:
            active = self._alarms.pop(key, None) is not None
        if active and self._on_alarm_cleared is not None:
            _call_safely(self._on_alarm_cleared, text)


def _call_safely(callback: Callable[..., None], *args: object) -> None:
    """Run a user callback; an exception is logged, never allowed to stop the worker."""
    try:
        callback(*args)
    except Exception:
        log.exception("reject link callback %r failed", callback)


def _nak_name(code: int) -> str:
    try:
        return NakCode(code).name
    except ValueError:
        return f"code {code}"
