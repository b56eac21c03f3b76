"""Transports that publish into a data model the PLC polls (Modbus registers, OPC UA variables).

:class:`RejectLink` speaks in messages: it writes a VERDICT or HEARTBEAT body and waits for the
ACK/NAK body. A :class:`RegisterTransport` turns each written message into an update of its
:class:`RegisterImage` and each PLC write of ACK_SEQ / NAK_SEQ / HEARTBEAT_ECHO / EPOCH_ACK / STOP_ACK into
the reply the link waits for (only a write made after the value was published counts: see register_map.py), so retries, ordering, deadlines, heartbeats, silence alarms and re-delivery
after a restart stay the link's, identical for every transport. Subclasses serve the image.
"""
from __future__ import annotations

import asyncio
import threading
from abc import abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any

from musc_edge.edge.links.base import ALARM_FOREIGN_WRITER, LinkIOError, Transport
from musc_edge.edge.links.framing import (
    FrameError,
    MessageType,
    NakCode,
    ack_frame,
    decode_body,
    encode_body,
    nak_frame,
    parse_verdict,
)
from musc_edge.edge.links.register_map import (
    LineState,
    PlcEvents,
    PublishedVerdict,
    Reg,
    RegisterImage,
    calibration_register,
    new_nonce,
    part_text_registers,
    split32,
)

# The framed links' STOP_LINE message type (0x03, added with the stop-line primitive).
STOP_LINE_TYPE = int(getattr(MessageType, "STOP_LINE", 0x03))


class RegisterTransport(Transport):
    """Frames in, register updates out; PLC writes in, ACK/NAK bodies out. Subclasses serve ``image``."""

    def __init__(self) -> None:
        self.image = RegisterImage()
        self._calibration = calibration_register(0)
        self._in_flight: tuple[int, int] | None = None      # (message type, seq) awaiting the PLC
        self._nonce = 0                                      # the heartbeat nonce in HEARTBEAT
        self._raise_alarm: Callable[[str, str], None] = lambda key, text: None
        self._clear_alarm: Callable[[str, str], None] = lambda key, text: None
        self.foreign_writes = 0                              # writes refused: not from the PLC
        # The server runs on its own asyncio loop in its own thread (_serve_on_own_loop / _stop_serving).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None

    def _serve_on_own_loop(self, start: Callable[[], Coroutine], timeout_s: float) -> Any:
        """Start an asyncio loop on its own thread and run ``start()`` there; returns its result. On failure
        the transport is closed and LinkIOError names it."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"{self.description} server", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            return asyncio.run_coroutine_threadsafe(start(), loop).result(timeout_s)
        except Exception as exc:
            self.close()
            raise LinkIOError(f"cannot serve {self.description}: {exc}") from exc

    def _stop_serving(self, shutdown: Callable[[Any], Coroutine], timeout_s: float) -> None:
        """Forget the server, await ``shutdown(server)`` on its loop, then stop the loop and join its thread."""
        loop, thread, server = self._loop, self._thread, self._server
        self._loop = self._thread = self._server = None
        self._in_flight = None
        if loop is not None:
            stop_server_loop(loop, thread, None if server is None else shutdown(server), timeout_s)

    def bind_alarms(self, raise_alarm: Callable[[str, str], None], clear_alarm: Callable[[str, str], None]) -> None:
        self._raise_alarm, self._clear_alarm = raise_alarm, clear_alarm

    def refuse_writer(self, who: str, why: str) -> None:
        """A write from ``who`` was refused because ``why``: count it and raise the foreign-writer alarm."""
        self.foreign_writes += 1
        self._raise_alarm(ALARM_FOREIGN_WRITER, f"{self.description}: write from {who} refused: {why} "
                          f"({self.foreign_writes} refused so far)")

    @property
    @abstractmethod
    def serving(self) -> bool:
        """The server is up (open() succeeded and close() was not called)."""

    def plc_connected(self) -> bool:
        """False when the transport knows no PLC is connected (a write then counts as a failed try)."""
        return True

    def published(self) -> None:
        """Called after every change of the runtime's registers: push them to the PLC's view."""

    # ------------------------------------------------------------------ runtime side

    def set_calibration_version(self, version: str | int) -> None:
        self._calibration = calibration_register(version)
        self.image.update({Reg.CALIBRATION: self._calibration})
        if self.serving:
            self.published()

    def raise_stop_line(self, reason: str) -> bool:
        """Raise STOP_LINE, count it in STOP_COUNT and state ``reason``; the PLC echoes STOP_COUNT.

        Idempotent while the PLC has not acknowledged: a repeat keeps STOP_COUNT (only the text follows).
        """
        if not self.serving:
            raise LinkIOError(f"{self.description} is not open")
        v = self.image.snapshot()
        waiting = v[Reg.STOP_LINE] == 1 and self.image.events.stop_acked != v[Reg.STOP_COUNT]
        count = v[Reg.STOP_COUNT] if waiting else (v[Reg.STOP_COUNT] + 1) & 0xFFFF or 1
        text = part_text_registers(str(reason) or "stop requested")
        changes = {Reg.STOP_LINE: 1, Reg.LINE_STATE: LineState.STOP_REQUESTED,
                   **{Reg.STOP_TEXT + i: value for i, value in enumerate(text)}}
        if count != v[Reg.STOP_COUNT]:
            changes[Reg.STOP_COUNT] = count
        self.image.update(changes)
        self.published()
        return self.plc_connected()

    def send_stop_line(self, reason: str) -> bool:
        """The link worker's stop-line exchange: raise it, then :meth:`read` waits for STOP_ACK."""
        sent = self.raise_stop_line(reason)
        self._in_flight = (STOP_LINE_TYPE, 0)
        return sent

    def write(self, body: bytes) -> bool:
        if not self.serving:
            raise LinkIOError(f"{self.description} is not open")
        frame = decode_body(body)
        if frame.type is MessageType.VERDICT:
            message = parse_verdict(frame)
            self.image.publish(PublishedVerdict(message.seq, frame.payload[1], int(message.reason),
                                                message.flags, message.part_id, self._calibration, frame.epoch))
        elif frame.type is MessageType.HEARTBEAT:
            pending = int.from_bytes(frame.payload[:2], "big")
            self._nonce = new_nonce(self._nonce)
            self.image.update({Reg.HEARTBEAT: self._nonce, Reg.HEARTBEAT_COUNT: frame.seq & 0xFFFF,
                               Reg.PENDING: pending})
        elif frame.type is MessageType.EPOCH:
            high, low = split32(frame.epoch)
            self.image.update({Reg.EPOCH_HI: high, Reg.EPOCH_LO: low})
        elif frame.type == STOP_LINE_TYPE:
            return self.send_stop_line(frame.payload.decode("utf-8", "replace"))
        else:
            raise ValueError(f"{frame.type.name} is not sent to a PLC")
        self._in_flight = (int(frame.type), frame.epoch if frame.type is MessageType.EPOCH else frame.seq)
        self.published()
        return self.plc_connected()

    def read(self, timeout_s: float) -> list[bytes | FrameError]:
        in_flight = self._in_flight
        if in_flight is None or not self.serving:
            return []
        kind, seq = in_flight
        epoch, nonce = self.line_epoch, self._nonce

        def reply(v: list[int], events: PlcEvents) -> bytes | None:
            """The PLC's answer to the message in flight, from what it wrote since (under the image's lock)."""
            if kind == MessageType.HEARTBEAT:
                answered = events.echoed == nonce
            elif kind == STOP_LINE_TYPE:
                answered = v[Reg.STOP_COUNT] != 0 and events.stop_acked == v[Reg.STOP_COUNT]
            elif kind == MessageType.EPOCH:
                answered = events.epoch_acked == seq
            else:
                answered = events.acked_seq == seq
                if not answered and events.nak is not None and events.nak[0] == seq:
                    code = events.nak[1]
                    events.nak = None
                    v[Reg.NAK_SEQ_HI] = v[Reg.NAK_SEQ_LO] = v[Reg.NAK_CODE] = 0     # one NAK, one refusal
                    known = code in NakCode._value2member_map_
                    return encode_body(nak_frame(seq, kind, NakCode(code) if known else NakCode.BAD_FORMAT,
                                                 epoch=epoch))
            if not answered:
                return None
            return encode_body(ack_frame(0 if kind == MessageType.EPOCH else seq, kind,   # type: ignore[arg-type]
                                         epoch=epoch))

        body = self.image.wait_for_plc(reply, timeout_s)
        if body is None:
            return []
        self.published()                    # NEW_VERDICT / NAK registers may have been cleared
        return [body]


def stop_server_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread | None,
                     stop: Coroutine | None, timeout_s: float) -> None:
    """Stop a server that runs on its own asyncio ``loop`` in ``thread`` (how the Modbus and OPC UA
    transports serve): await ``stop`` on the loop, then stop the loop and join its thread."""
    if stop is not None:
        try:
            asyncio.run_coroutine_threadsafe(stop, loop).result(timeout_s)
        except Exception:
            pass                                  # already gone; the loop stops below either way
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout_s)
    if not loop.is_running():
        loop.close()
