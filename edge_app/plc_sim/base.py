"""What every PLC simulator shares: counters, the verdict record, the fault and inspection controls
(:class:`SimControls`: silence, refusals, (epoch, seq) de-duplication, the verdict log) and the serve-and-report
loop of ``musc-edge plc-sim``. The framed simulator (framed.py) and the polling ones (polling.py: Modbus, OPC UA)
build on it; cli.py is the command.
"""
from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, TextIO, TypeVar

from musc_edge.edge.links.framing import MAX_SEQ, NakCode
from musc_edge.edge.record import Reason

FRAMED_LINKS = ("serial", "zmq")                      # the simulator is the PLC end of a framed link
PLANT_LINKS = ("modbus-tcp", "modbus-rtu", "opcua")    # the simulator is a client of the runtime's server


@dataclass
class SimCounters:
    received: int = 0               # distinct verdicts (each logged once)
    duplicates: int = 0             # verdicts whose seq was already seen (acked again, not logged)
    out_of_order: int = 0           # new seqs below the highest seen (serial-number arithmetic)
    heartbeats: int = 0
    heartbeat_gaps: int = 0         # heartbeat counters skipped
    crc_errors: int = 0
    bad_frames: int = 0             # framing, length, version or field errors
    acks_sent: int = 0
    naks_sent: int = 0
    ignored_while_silent: int = 0
    corrupted_replies: int = 0      # replies deliberately damaged (corrupt_rate)
    stop_lines: int = 0             # STOP_LINE requests received (repeats included)
    epochs: int = 0                 # distinct line epochs seen (announced or carried by a verdict)


@dataclass(frozen=True)
class ReceivedVerdict:
    seq: int
    part_id: str
    verdict: str
    reason: int
    reason_label: str
    late: bool
    resend: bool
    received_utc: str
    epoch: int = 0


def utc_now() -> str:
    """This moment in UTC, ISO 8601 to the millisecond (the simulators' log time stamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")



_Sim = TypeVar("_Sim", bound="SimControls")


class SimControls(ABC):
    """The fault and inspection controls, life cycle and verdict log every PLC simulator offers its tests and
    benches. A simulator sets ``_changed`` (a Condition guarding the rest), ``_counters``, ``_received``,
    ``_refusals``, ``_refusal_code``, ``_silent_until``, ``_silent_after``, ``_silent_for_s``, ``_seen``,
    ``_dedup_window``, ``_highest_seqs``, ``_stop``, ``_thread`` (its serving loop) and ``_log``, and implements
    ``_disconnect()`` (release its port or connection)."""

    _changed: threading.Condition
    _counters: SimCounters
    _received: list[ReceivedVerdict]
    _refusals: int
    _refusal_code: NakCode
    _silent_until: float
    _seen: OrderedDict
    _dedup_window: int
    _highest_seqs: dict[int, int]       # line epoch -> highest seq taken in it
    _silent_after: int | None
    _silent_for_s: float
    _stop: threading.Event
    _thread: threading.Thread
    _log: TextIO | None

    def start(self: _Sim) -> _Sim:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering for good and release the port and log file."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._disconnect()
        if self._log is not None:
            self._log.close()
            self._log = None

    @abstractmethod
    def _disconnect(self) -> None:
        """Release the simulator's port or connection."""

    def _log_entry(self, entry: dict) -> None:
        if self._log is not None:
            self._log.write(json.dumps(entry) + "\n")
            self._log.flush()

    def _record(self, record: ReceivedVerdict, **extra: Any) -> None:
        """Keep a new distinct verdict (call with ``_changed`` held): count it, log it (with ``extra``) and,
        if this is the ``silent_after``-th, go silent for ``silent_for_s``. The verdict itself is acked."""
        self._received.append(record)
        self._counters.received += 1
        self._log_entry(asdict(record) | extra)
        if self._silent_after is not None and self._counters.received == self._silent_after:
            self._silent_until = time.monotonic() + self._silent_for_s

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def refuse_next(self, count: int, code: NakCode = NakCode.BUSY) -> None:
        """Answer the next ``count`` verdicts with NAK ``code`` instead of taking them."""
        with self._changed:
            self._refusals, self._refusal_code = count, code

    def silence(self, seconds: float) -> None:
        """Ignore everything received for ``seconds`` from now (0 answers again at once)."""
        with self._changed:
            self._silent_until = time.monotonic() + seconds

    def counters(self) -> SimCounters:
        with self._changed:
            return replace(self._counters)

    def received(self) -> list[ReceivedVerdict]:
        """Distinct verdicts in arrival order."""
        with self._changed:
            return list(self._received)

    def wait_for(self, condition: Callable[[SimCounters], bool], timeout_s: float) -> bool:
        """Block until ``condition(counters)`` holds; False if ``timeout_s`` passes first."""
        with self._changed:
            return self._changed.wait_for(lambda: condition(self._counters), timeout_s)

    def _note_epoch(self, epoch: int) -> None:
        """A line epoch announced or carried by a verdict (the caller holds ``_changed``): a new one starts its
        own de-duplication record."""
        if epoch not in self._highest_seqs:
            self._highest_seqs[epoch] = -1
            self._counters.epochs += 1

    def _note_seq(self, seq: int, epoch: int = 0) -> bool:
        """Record a verdict's (epoch, sequence number) (the caller holds ``_changed``): False for a duplicate,
        which is counted and dropped; one behind the highest seen in its epoch is counted out of order."""
        self._note_epoch(epoch)
        if (epoch, seq) in self._seen:
            self._counters.duplicates += 1
            return False
        self._seen[(epoch, seq)] = None
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)
        highest = self._highest_seqs[epoch]
        if highest < 0 or seq_after(seq, highest):
            self._highest_seqs[epoch] = seq
        else:
            self._counters.out_of_order += 1
        return True


def reason_label(reason: Reason | int) -> str:
    return reason.label if isinstance(reason, Reason) else f"unknown_{reason}"


def seq_after(seq: int, reference: int) -> bool:
    """RFC 1982 serial-number order on 32 bits: ``seq`` comes after ``reference``."""
    return 0 < (seq - reference) % (MAX_SEQ + 1) < 0x80000000


def serve_and_report(sim: SimControls, duration: float, report_every: float, counters: Callable[[], str]) -> None:
    """Run ``sim`` for ``duration`` seconds (0: until Ctrl-C), printing ``counters()`` every ``report_every``
    seconds (0: never) and once at the end."""
    end = time.monotonic() + duration if duration > 0 else float("inf")
    with sim:
        try:
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(left, report_every if report_every > 0 else 1.0))
                if report_every > 0:
                    print(f"plc-sim: {counters()}", flush=True)
        except KeyboardInterrupt:
            pass
    print(f"plc-sim: final {counters()}", flush=True)


def counter_line(counters: SimCounters) -> str:
    """The counters as ``name=value`` pairs, one line."""
    return " ".join(f"{key}={value}" for key, value in asdict(counters).items())
