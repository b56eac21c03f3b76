"""The framed-link PLC simulator: the other end of a serial or ZeroMQ reject link, for tests and bench runs.

It acknowledges verdicts and heartbeats as docs/wire-protocol.md asks of a PLC, keeps one de-duplication
record per line epoch (a verdict is new unless its (epoch, seq) was seen), logs every verdict once (repeats
are counted, not logged), and can misbehave on purpose: stop answering for a while,
answer late, or corrupt frames (seeded). ``musc-edge plc-sim --link serial|zmq`` runs it (cli.py).
"""
from __future__ import annotations

import os
import random
import select
import threading
import time
import tty
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, TextIO

import serial
import zmq

from musc_edge.edge.links.framing import (
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
from musc_edge.edge.plc_sim.base import ReceivedVerdict, SimControls, SimCounters, reason_label, utc_now

_POLL_S = 0.02
Route = Any     # where a reply goes: a ZeroMQ peer identity, or None on a byte stream


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
                reason=int(message.reason), reason_label=reason_label(message.reason),
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



def _flip_random_bit(body: bytes, rng: random.Random) -> bytes:
    damaged = bytearray(body)
    damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)
