"""The PLC side of the plant-protocol links (Modbus, OPC UA): a scan loop that polls the runtime.

A real PLC reads the runtime's verdict block once per scan; on a new EPOCH it starts a new de-duplication
record and writes EPOCH_ACK; it acts on a NEW verdict once per (EPOCH, SEQ), and writes the SEQ back; it copies
the HEARTBEAT nonce to HEARTBEAT_ECHO. :class:`PollingPlcSimulator` is that scan
with the same bookkeeping and the same faults as the framed-link simulator (framed.py):
silence, late answers, corrupted answers (a damaged ACK_SEQ) and refusals (NAK). Subclasses supply
the protocol: one read of the block, and the three writes.
"""
from __future__ import annotations

import random
import threading
import time
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from musc_edge.edge.links.framing import NakCode, VerdictCode, VerdictFlags
from musc_edge.edge.links.register_map import PublishedVerdict
from musc_edge.edge.plc_sim.base import ReceivedVerdict, SimControls, SimCounters, reason_label, utc_now
from musc_edge.edge.record import Reason


@dataclass(frozen=True)
class PlcView:
    """What one scan reads from the runtime."""

    heartbeat: int                  # the nonce: echo it when it changes
    new_verdict: bool
    verdict: PublishedVerdict
    stop_count: int = 0
    nak_pending: bool = False       # the PLC's last refusal is not yet read by the runtime
    epoch: int = 0                  # the line epoch the runtime announces
    epoch_acked: int = 0            # what EPOCH_ACK holds
    heartbeat_count: int | None = None   # +1 per heartbeat (gaps: lost heartbeats); None: not shown


class PollingPlcSimulator(SimControls):
    """Plays a polling PLC in a background thread. Use as a context manager (starts it).

    Options as :class:`musc_edge.edge.plc_sim.framed.PlcSimulator`; ``scan_s`` is the PLC's scan period.
    """

    def __init__(self, *, scan_s: float = 0.005, delay_s: float = 0.0, corrupt_rate: float = 0.0,
                 seed: int = 0, silent_after: int | None = None, silent_for_s: float = 0.0,
                 log_path: str | Path | None = None, dedup_window: int = 65536) -> None:
        if scan_s <= 0 or delay_s < 0 or silent_for_s < 0:
            raise ValueError(f"scan_s={scan_s} must be > 0, delay_s={delay_s} and silent_for_s={silent_for_s} >= 0")
        if not 0.0 <= corrupt_rate <= 1.0:
            raise ValueError(f"corrupt_rate={corrupt_rate} must be within 0..1")
        if silent_after is not None and silent_after < 0:
            raise ValueError(f"silent_after={silent_after} must be >= 0")
        self.scan_s, self.delay_s, self.corrupt_rate = scan_s, delay_s, corrupt_rate
        self._silent_after, self._silent_for_s = silent_after, silent_for_s
        self._silent_until = time.monotonic() + silent_for_s if silent_after == 0 else 0.0
        self._rng = random.Random(seed)
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._dedup_window = dedup_window
        self._highest_seqs: dict[int, int] = {}
        self._last_heartbeat: int | None = None
        self._last_heartbeat_count: int | None = None
        self._refusals, self._refusal_code = 0, NakCode.BUSY
        self._counters = SimCounters()
        self._received: list[ReceivedVerdict] = []
        self.stop_requests = 0
        self.link_errors = 0                  # scans that failed to reach the runtime
        self._stop_seen: int | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._log: TextIO | None = open(log_path, "a", encoding="utf-8") if log_path else None
        self._thread = threading.Thread(target=self._run, name=f"plc-sim {type(self).__name__}", daemon=True)

    address: str

    # ------------------------------------------------------------------ protocol (subclasses)

    @abstractmethod
    def _connect(self) -> None:
        """(Re)connect to the runtime; raise OSError/ConnectionError when it is not there."""

    @abstractmethod
    def _read(self) -> PlcView:
        """One scan's read of the runtime's block; raise OSError/ConnectionError on a broken link."""

    @abstractmethod
    def _write_ack(self, seq: int) -> None: ...

    @abstractmethod
    def _write_nak(self, seq: int, code: NakCode) -> None: ...

    @abstractmethod
    def _write_heartbeat_echo(self, counter: int) -> None: ...

    @abstractmethod
    def _write_epoch_ack(self, epoch: int) -> None: ...

    def _write_stop_ack(self, count: int) -> None:
        """Acknowledge a stop-line request (optional for a protocol)."""

    # ------------------------------------------------------------------ the scan

    def _run(self) -> None:
        connected = False
        while not self._stop.is_set():
            started = time.monotonic()
            with self._changed:
                silent = started < self._silent_until
                if silent:
                    self._counters.ignored_while_silent += 1
            if not silent:
                try:
                    if not connected:
                        self._connect()
                        connected = True
                    self._scan()
                except (OSError, ConnectionError, TimeoutError, RuntimeError):
                    self._disconnect()            # the runtime is away (restart, cable): retry next scan
                    connected = False
                    self.link_errors += 1
            with self._changed:
                self._changed.notify_all()
            self._stop.wait(max(0.0, self.scan_s - (time.monotonic() - started)))

    def _scan(self) -> None:
        view = self._read()
        if view.epoch and view.epoch_acked != view.epoch:
            with self._changed:
                self._note_epoch(view.epoch)        # a new de-duplication record for a new epoch
            self._write_epoch_ack(view.epoch)
        if view.heartbeat and view.heartbeat != self._last_heartbeat:      # 0: no heartbeat published yet
            with self._changed:
                self._counters.heartbeats += 1
                count, last = view.heartbeat_count, self._last_heartbeat_count
                if count is not None and last is not None and count != (last + 1) & 0xFFFF:
                    self._counters.heartbeat_gaps += 1
                self._last_heartbeat, self._last_heartbeat_count = view.heartbeat, count
            self._write_heartbeat_echo(view.heartbeat)
        if view.stop_count and view.stop_count != self._stop_seen:
            self._stop_seen = view.stop_count
            self.stop_requests += 1
            self._write_stop_ack(view.stop_count)
        if not view.new_verdict or view.epoch_acked != view.epoch:
            return
        message = view.verdict
        if view.nak_pending:
            return                                  # refuse once per publication: wait for the runtime
        with self._changed:
            refuse = self._refusals > 0
            if refuse:
                self._refusals -= 1
                code = self._refusal_code
        if refuse:
            self._write_nak(message.seq, code)
            with self._changed:
                self._counters.naks_sent += 1
            return
        self._take(message)
        if self.delay_s and self._stop.wait(self.delay_s):
            return
        with self._changed:
            corrupt = self._rng.random() < self.corrupt_rate
            if corrupt:
                self._counters.corrupted_replies += 1
            else:
                self._counters.acks_sent += 1
        self._write_ack(message.seq ^ (1 << self._rng.randrange(32)) if corrupt else message.seq)

    def _take(self, message: PublishedVerdict) -> None:
        with self._changed:
            if not self._note_seq(message.seq, message.epoch):
                return
            try:
                verdict = VerdictCode(message.verdict).to_verdict().value
            except ValueError:
                verdict = f"invalid_{message.verdict}"
            reason: Reason | int = Reason(message.reason) if message.reason in Reason._value2member_map_ \
                else message.reason
            record = ReceivedVerdict(
                seq=message.seq, part_id=message.part_id, verdict=verdict, reason=int(message.reason),
                reason_label=reason_label(reason), late=bool(message.flags & VerdictFlags.LATE),
                resend=bool(message.flags & VerdictFlags.RESEND),
                received_utc=utc_now(), epoch=message.epoch)
            self._record(record, calibration=message.calibration)

