"""A PLC simulator: the other end of a reject link (serial or ZeroMQ), for tests and bench runs.

It acknowledges verdicts and heartbeats as docs/wire-protocol.md asks of a PLC, keeps one de-duplication
record per line epoch (a verdict is new unless its (epoch, seq) was seen), logs every verdict once (repeats
are counted, not logged), and can misbehave on purpose: stop answering for a while,
answer late, or corrupt frames (seeded). ``musc-edge plc-sim`` runs :func:`main`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import sys
import threading
import time
import tty
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TextIO, TypeVar

import serial
import zmq

from musc_edge.edge.links.framing import (
    MAX_SEQ,
    Frame,
    FrameError,
    MessageType,
    NakCode,
    StreamDeframer,
    VerdictFlags,
    ack_frame,
    decode_body,
    encode_body,
    nak_frame,
    parse_stop_line,
    parse_verdict,
    stream_frame,
)
from musc_edge.edge.record import Reason

_POLL_S = 0.02
FRAMED_LINKS = ("serial", "zmq")                      # the simulator is the PLC end of a framed link
PLANT_LINKS = ("modbus-tcp", "modbus-rtu", "opcua")    # the simulator is a client of the runtime's server
Route = Any     # where a reply goes: a ZeroMQ peer identity, or None on a byte stream


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


class SimPort(ABC):
    """The simulator's end of a transport."""

    address: str        # what the runtime side connects to

    @abstractmethod
    def receive(self, timeout_s: float) -> list[tuple[Route, bytes | FrameError]]:
        """Bodies that arrived within ``timeout_s``, each with the route to answer it on."""

    @abstractmethod
    def reply(self, route: Route, body: bytes) -> None:
        """Send one body back."""

    @abstractmethod
    def close(self) -> None:
        """Release the port."""


class ZmqSimPort(SimPort):
    """A ROUTER bound to ``endpoint`` (``tcp://127.0.0.1:*`` picks a free port; see ``address``)."""

    def __init__(self, endpoint: str, context: zmq.Context | None = None) -> None:
        self._socket = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ValueError(f"cannot bind PLC simulator to {endpoint!r}: {exc}") from exc
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def receive(self, timeout_s: float) -> list[tuple[Route, bytes | FrameError]]:
        out: list[tuple[Route, bytes | FrameError]] = []
        if not self._socket.poll(round(timeout_s * 1000), zmq.POLLIN):
            return out
        try:
            while True:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
                out.append((parts[0], parts[-1]))
        except zmq.Again:
            return out

    def reply(self, route: Route, body: bytes) -> None:
        self._socket.send_multipart([route, body])

    def close(self) -> None:
        self._socket.close(linger=0)


class StreamSimPort(SimPort, ABC):
    """A byte-stream end (serial port or pty master): bodies travel as 0x00|COBS|0x00."""

    def __init__(self) -> None:
        self._deframer = StreamDeframer()

    @abstractmethod
    def _read_bytes(self, timeout_s: float) -> bytes: ...

    @abstractmethod
    def _write_bytes(self, data: bytes) -> None: ...

    def receive(self, timeout_s: float) -> list[tuple[Route, bytes | FrameError]]:
        return [(None, item) for item in self._deframer.feed(self._read_bytes(timeout_s))]

    def reply(self, route: Route, body: bytes) -> None:
        self._write_bytes(stream_frame(body))


class SerialSimPort(StreamSimPort):
    """Any pyserial URL: a real port on a null-modem cable, one end of a socat pty pair, ..."""

    def __init__(self, url: str, baudrate: int = 115200) -> None:
        super().__init__()
        try:
            self._port = serial.serial_for_url(url, baudrate=baudrate, timeout=_POLL_S, write_timeout=1.0)
        except (ValueError, serial.SerialException) as exc:
            raise ValueError(f"cannot open PLC simulator serial port {url!r}: {exc}") from exc
        self.address = url

    def _read_bytes(self, timeout_s: float) -> bytes:
        data = self._port.read(1)
        return data + self._port.read(self._port.in_waiting) if data else data

    def _write_bytes(self, data: bytes) -> None:
        self._port.write(data)

    def close(self) -> None:
        self._port.close()


class PtySimPort(StreamSimPort):
    """A new pseudo-terminal: the simulator keeps the master, the runtime opens ``address``."""

    def __init__(self) -> None:
        super().__init__()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)         # the slave stays open so the master never sees EIO
        self.address = os.ttyname(self._slave)

    def _read_bytes(self, timeout_s: float) -> bytes:
        ready, _, _ = select.select([self._master], [], [], timeout_s)
        return os.read(self._master, 4096) if ready else b""

    def _write_bytes(self, data: bytes) -> None:
        os.write(self._master, data)

    def close(self) -> None:
        os.close(self._master)
        os.close(self._slave)


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
        if highest < 0 or _seq_after(seq, highest):
            self._highest_seqs[epoch] = seq
        else:
            self._counters.out_of_order += 1
        return True


class PlcSimulator(SimControls):
    """Plays the PLC on one port in a background thread. Use as a context manager (starts it).

    ``silent_after`` verdicts (then ``silent_for_s`` seconds) and :meth:`silence` make it ignore
    everything, as if the cable were pulled; ``delay_s`` delays every reply; ``corrupt_rate`` damages
    that share of received frames (answered with NAK bad_crc) and of replies (seeded by ``seed``);
    :meth:`refuse_next` NAKs verdicts. Verdict (epoch, seq) pairs are remembered for de-duplication in a
    window of the last ``dedup_window`` distinct ones.
    """

    def __init__(self, port: SimPort, *, delay_s: float = 0.0, corrupt_rate: float = 0.0, seed: int = 0,
                 silent_after: int | None = None, silent_for_s: float = 0.0,
                 log_path: str | Path | None = None, dedup_window: int = 65536) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s={delay_s} must be >= 0")
        if not 0.0 <= corrupt_rate <= 1.0:
            raise ValueError(f"corrupt_rate={corrupt_rate} must be within 0..1")
        if silent_after is not None and silent_after < 0:
            raise ValueError(f"silent_after={silent_after} must be >= 0")
        if silent_for_s < 0:
            raise ValueError(f"silent_for_s={silent_for_s} must be >= 0")
        if dedup_window < 1:
            raise ValueError(f"dedup_window={dedup_window} must be >= 1")
        self.port = port
        self.delay_s, self.corrupt_rate = delay_s, corrupt_rate
        self._silent_after, self._silent_for_s = silent_after, silent_for_s
        self._rng = random.Random(seed)
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._highest_seqs: dict[int, int] = {}
        self._dedup_window = dedup_window
        self._counters = SimCounters()
        self._received: list[ReceivedVerdict] = []
        self._last_heartbeat: int | None = None
        self._stop_reasons: list[str] = []
        self.on_stop_line: Callable[[str], None] | None = None   # called (sim thread) per new stop reason
        self._silent_until = time.monotonic() + silent_for_s if silent_after == 0 else 0.0
        self._refusals, self._refusal_code = 0, NakCode.BUSY
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._log: TextIO | None = open(log_path, "a", encoding="utf-8") if log_path else None
        self._thread = threading.Thread(target=self._run, name=f"plc-sim {port.address}", daemon=True)

    @classmethod
    def on_zmq(cls, endpoint: str = "tcp://127.0.0.1:5557", **options: Any) -> PlcSimulator:
        """A ROUTER bound to ``endpoint``; ``tcp://127.0.0.1:*`` picks a free port (see ``address``)."""
        return cls._owning(ZmqSimPort(endpoint), options)

    @classmethod
    def on_serial(cls, url: str, baudrate: int = 115200, **options: Any) -> PlcSimulator:
        """Any pyserial URL or device path."""
        return cls._owning(SerialSimPort(url, baudrate), options)

    @classmethod
    def on_pty(cls, **options: Any) -> PlcSimulator:
        """A new pseudo-terminal; the runtime opens ``address`` (the slave's path)."""
        return cls._owning(PtySimPort(), options)

    @classmethod
    def _owning(cls, port: SimPort, options: dict[str, Any]) -> PlcSimulator:
        try:
            return cls(port, **options)
        except BaseException:
            port.close()
            raise

    @property
    def address(self) -> str:
        return self.port.address

    # ----------------------------------------------------------------------------- control

    def _disconnect(self) -> None:
        self.port.close()

    def stop_reasons(self) -> list[str]:
        """Reasons of the line stops received, in order (a repeated request is listed once)."""
        with self._changed:
            return list(self._stop_reasons)

    # ----------------------------------------------------------------------------- protocol

    def _run(self) -> None:
        while not self._stop.is_set():
            for route, item in self.port.receive(_POLL_S):
                self._handle(route, item)

    def _handle(self, route: Route, item: bytes | FrameError) -> None:
        with self._changed:
            silent = time.monotonic() < self._silent_until
            if silent:
                self._counters.ignored_while_silent += 1
            elif isinstance(item, FrameError):
                self._counters.bad_frames += 1
            elif self._rng.random() < self.corrupt_rate:
                item = _flip_random_bit(item, self._rng)
        if silent or isinstance(item, FrameError):
            return self._notify()
        try:
            frame = decode_body(item)
            reply = self._answer(frame)
        except FrameError as exc:
            with self._changed:
                if exc.code is NakCode.BAD_CRC:
                    self._counters.crc_errors += 1
                else:
                    self._counters.bad_frames += 1
            reply = None if exc.seq is None else nak_frame(exc.seq, exc.msg_type or 0, exc.code, epoch=exc.epoch)
        if reply is not None:
            self._send(route, reply)
        self._notify()

    def _answer(self, frame: Frame) -> Frame:
        if frame.type is MessageType.VERDICT:
            with self._changed:
                if self._refusals > 0:
                    self._refusals -= 1
                    return nak_frame(frame.seq, frame.type, self._refusal_code, epoch=frame.epoch)
            self._take_verdict(frame)
        elif frame.type is MessageType.EPOCH:
            with self._changed:
                self._note_epoch(frame.epoch)
        elif frame.type is MessageType.STOP_LINE:
            reason = parse_stop_line(frame)
            with self._changed:
                self._counters.stop_lines += 1
                new = not self._stop_reasons or self._stop_reasons[-1] != reason
                if new:
                    self._stop_reasons.append(reason)
                    self._log_entry({"stop_line": reason, "received_utc": utc_now()})
            if new and self.on_stop_line is not None:
                self.on_stop_line(reason)
        elif frame.type is MessageType.HEARTBEAT:
            with self._changed:
                self._counters.heartbeats += 1
                if self._last_heartbeat is not None and frame.seq != self._last_heartbeat + 1:
                    self._counters.heartbeat_gaps += 1
                self._last_heartbeat = frame.seq
        else:
            raise FrameError(NakCode.UNKNOWN_TYPE, f"{frame.type.name} is not sent to a PLC",
                             frame.seq, frame.type)
        return ack_frame(frame.seq, frame.type, epoch=frame.epoch)

    def _take_verdict(self, frame: Frame) -> None:
        message = parse_verdict(frame)
        with self._changed:
            if not self._note_seq(message.seq, message.epoch):
                return
            record = ReceivedVerdict(
                seq=message.seq, part_id=message.part_id, verdict=message.verdict.value,
                reason=int(message.reason), reason_label=_reason_label(message.reason),
                late=bool(message.flags & VerdictFlags.LATE), resend=bool(message.flags & VerdictFlags.RESEND),
                received_utc=utc_now(), epoch=message.epoch)
            self._record(record)

    def _send(self, route: Route, frame: Frame) -> None:
        if self.delay_s and self._stop.wait(self.delay_s):
            return
        body = encode_body(frame)
        with self._changed:
            if self._rng.random() < self.corrupt_rate:
                body = _flip_random_bit(body, self._rng)
                self._counters.corrupted_replies += 1
            if frame.type is MessageType.ACK:
                self._counters.acks_sent += 1
            else:
                self._counters.naks_sent += 1
        self.port.reply(route, body)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()


def _reason_label(reason: Reason | int) -> str:
    return reason.label if isinstance(reason, Reason) else f"unknown_{reason}"


def _seq_after(seq: int, reference: int) -> bool:
    """RFC 1982 serial-number order on 32 bits: ``seq`` comes after ``reference``."""
    return 0 < (seq - reference) % (MAX_SEQ + 1) < 0x80000000


def _flip_random_bit(body: bytes, rng: random.Random) -> bytes:
    damaged = bytearray(body)
    damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


# --------------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musc-edge plc-sim", description="Play the PLC end of a reject link (docs/wire-protocol.md).",
        epilog="The options below are those of serial and zmq; modbus-tcp, modbus-rtu and opcua have their own: "
               "musc-edge plc-sim --link modbus-tcp --help")
    parser.add_argument("--link", choices=(*FRAMED_LINKS, *PLANT_LINKS), required=True,
                        help="the link type the runtime's config names (link.type)")
    parser.add_argument("--url", help="serial: pyserial URL or device; 'pty' creates a pseudo-terminal "
                                      "and prints the path for the runtime's link.url")
    parser.add_argument("--baudrate", type=int, default=115200)
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5557", help="zmq: ROUTER bind endpoint")
    parser.add_argument("--log", type=Path, help="append every received verdict (once) as a JSON line")
    parser.add_argument("--report-every", type=float, default=10.0, metavar="SECONDS",
                        help="print the counters this often (0: only at exit)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="answer this late")
    parser.add_argument("--corrupt-rate", type=float, default=0.0, help="share of frames to damage, 0..1")
    parser.add_argument("--seed", type=int, default=0, help="seed for --corrupt-rate")
    parser.add_argument("--silent-after", type=int, metavar="N", help="stop answering after N verdicts")
    parser.add_argument("--silent-for", type=float, default=5.0, metavar="SECONDS",
                        help="how long --silent-after stays silent")
    parser.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                        help="exit after this long (0: run until Ctrl-C)")
    return parser


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


def _counter_line(counters: SimCounters) -> str:
    return " ".join(f"{key}={value}" for key, value in asdict(counters).items())


def main(argv: list[str] | None = None) -> int:
    """``musc-edge plc-sim``: run a simulator until Ctrl-C or --duration; 0 on a clean exit."""
    from musc_edge.edge.plc_sim_plant import is_plant_link, main as plant_main   # Modbus / OPC UA: their own options

    plant_argv = sys.argv[1:] if argv is None else argv
    if is_plant_link(plant_argv):
        return plant_main(plant_argv)
    args = _parser().parse_args(argv)
    if args.link == "serial" and not args.url:
        print("plc-sim: --link serial needs --url (a device, a pyserial URL, or 'pty')", file=sys.stderr)
        return 2
    options = dict(delay_s=args.delay, corrupt_rate=args.corrupt_rate, seed=args.seed,
                   silent_after=args.silent_after, silent_for_s=args.silent_for, log_path=args.log)
    try:
        if args.link == "zmq":
            sim = PlcSimulator.on_zmq(args.endpoint, **options)
        elif args.url == "pty":
            sim = PlcSimulator.on_pty(**options)
        else:
            sim = PlcSimulator.on_serial(args.url, args.baudrate, **options)
    except (ValueError, OSError) as exc:
        print(f"plc-sim: {exc}", file=sys.stderr)
        return 2
    print(f"plc-sim: {args.link} PLC listening on {sim.address}", flush=True)
    sim.on_stop_line = lambda reason: print(f"plc-sim: STOP LINE requested: {reason}", flush=True)
    serve_and_report(sim, args.duration, args.report_every, lambda: _counter_line(sim.counters()))
    return 0
