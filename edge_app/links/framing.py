"""Wire format shared by every reject link and the PLC simulator (docs/wire-protocol.md).

A message *body* is::

    version u8 | type u8 | epoch u32 | seq u32 | length u8 | payload[length] | crc16 u16      (big-endian)

with CRC-16/CCITT-FALSE over everything before the CRC. ``epoch`` is the line epoch: a random non-zero id
created with the runtime's ledger (a new install, a fresh storage, another line: another epoch), so the PLC
de-duplicates on (epoch, seq) and never takes one install's seq for another's. ZeroMQ carries one body per message;
a byte stream (serial) carries ``0x00 | COBS(body) | 0x00``.
"""
from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass
from enum import IntEnum

from musc_edge.edge.record import Reason, Verdict

PROTOCOL_VERSION = 2                    # 2: the header carries the line epoch; EPOCH announces it
MAX_PART_ID_BYTES = 64
MAX_SEQ = 0xFFFFFFFF
MAX_EPOCH = 0xFFFFFFFF
DELIMITER = 0x00

_KNOWN_REASONS = frozenset(int(reason) for reason in Reason)
_HEADER = struct.Struct(">BBIIB")       # version, type, epoch, seq, payload length
_CRC = struct.Struct(">H")
_MIN_BODY = _HEADER.size + _CRC.size
MAX_BODY_BYTES = _MIN_BODY + 255
# A COBS-encoded body grows by at most one byte per 254 bytes, plus the leading code byte.
_MAX_ENCODED_BYTES = MAX_BODY_BYTES + MAX_BODY_BYTES // 254 + 2


class MessageType(IntEnum):
    VERDICT = 0x01      # runtime -> PLC: a part's verdict
    HEARTBEAT = 0x02    # runtime -> PLC: liveness, seq = heartbeat counter
    STOP_LINE = 0x03    # runtime -> PLC: stop the conveyor now; seq = stop counter, payload = reason (UTF-8)
    EPOCH = 0x04        # runtime -> PLC: a (new) line epoch; seq 0; acknowledged before the first verdict
    ACK = 0x06          # PLC -> runtime: payload = type being acknowledged
    NAK = 0x15          # PLC -> runtime: payload = type being refused, NakCode


class NakCode(IntEnum):
    BAD_CRC = 1         # CRC mismatch
    BAD_FORMAT = 2      # wrong version, length, or field value
    UNKNOWN_TYPE = 3    # message type not understood
    BUSY = 4            # receiver cannot take the message now; resend


class VerdictCode(IntEnum):
    """Verdict on the wire. 0 is never valid, so an all-zero frame can not mean ACCEPT."""

    ACCEPT = 1
    REJECT = 2
    NO_VERDICT = 3      # no verdict could be given; the PLC applies its fail-safe (reject)

    @classmethod
    def of(cls, verdict: Verdict) -> VerdictCode:
        return cls[verdict.name]

    def to_verdict(self) -> Verdict:
        return Verdict[self.name]


class VerdictFlags(IntEnum):
    LATE = 0x01         # sent after the part's deadline: the PLC has already applied its fail-safe
    RESEND = 0x02       # re-sent after a runtime restart


class FrameError(ValueError):
    """A body that cannot be used; ``code`` is what a receiver answers in its NAK.

    ``seq``, ``msg_type`` and ``epoch`` are the header's values when the header could be read (they may
    be corrupted when ``code`` is BAD_CRC).
    """

    def __init__(self, code: NakCode, detail: str, seq: int | None = None, msg_type: int | None = None,
                 epoch: int = 0):
        super().__init__(f"{code.name.lower()}: {detail}")
        self.code, self.detail, self.seq, self.msg_type, self.epoch = code, detail, seq, msg_type, epoch


@dataclass(frozen=True)
class Frame:
    type: MessageType
    seq: int
    payload: bytes = b""
    epoch: int = 0              # the line epoch (0: none, only in tests of the framing itself)


@dataclass(frozen=True)
class VerdictMessage:
    seq: int
    part_id: str
    verdict: Verdict
    reason: Reason | int          # an int only for a code this version does not know
    flags: int = 0
    epoch: int = 0


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final XOR (check 0x29B1)."""
    return binascii.crc_hqx(data, 0xFFFF)


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result contains no 0x00 byte."""
    out = bytearray()
    for piece in data.split(b"\x00"):       # each piece but the last was followed by a zero
        while len(piece) >= 0xFE:
            out.append(0xFF)                    # full block: 254 bytes, no zero implied
            out += piece[:0xFE]
            piece = piece[0xFE:]
        out.append(len(piece) + 1)
        out += piece
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; raises FrameError(BAD_FORMAT) on a malformed block."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise FrameError(NakCode.BAD_FORMAT, f"COBS block code 0 at offset {i}")
        end = i + code
        if end > n:
            raise FrameError(NakCode.BAD_FORMAT, f"COBS block at offset {i} runs past the frame end")
        out += data[i + 1:end]
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def encode_body(frame: Frame) -> bytes:
    """Header + payload + CRC for one message."""
    if not 0 <= frame.seq <= MAX_SEQ:
        raise ValueError(f"seq {frame.seq} is outside 0..{MAX_SEQ}")
    if not 0 <= frame.epoch <= MAX_EPOCH:
        raise ValueError(f"epoch {frame.epoch} is outside 0..{MAX_EPOCH}")
    if len(frame.payload) > 255:
        raise ValueError(f"payload of {len(frame.payload)} bytes is longer than 255")
    head = _HEADER.pack(PROTOCOL_VERSION, frame.type, frame.epoch, frame.seq, len(frame.payload)) + frame.payload
    return head + _CRC.pack(crc16(head))


def decode_body(body: bytes) -> Frame:
    """Parse and check one body; raises FrameError carrying the NAK code to answer with."""
    if len(body) < _MIN_BODY:
        raise FrameError(NakCode.BAD_FORMAT, f"body of {len(body)} bytes is shorter than {_MIN_BODY}")
    version, msg_type, epoch, seq, length = _HEADER.unpack_from(body)
    (crc,) = _CRC.unpack_from(body, len(body) - _CRC.size)
    if crc != crc16(body[:-_CRC.size]):
        raise FrameError(NakCode.BAD_CRC, f"crc 0x{crc:04X} does not match the body", seq, msg_type, epoch)
    if version != PROTOCOL_VERSION:
        raise FrameError(NakCode.BAD_FORMAT, f"protocol version {version}, expected {PROTOCOL_VERSION}",
                         seq, msg_type, epoch)
    if length != len(body) - _MIN_BODY:
        raise FrameError(NakCode.BAD_FORMAT, f"length field {length} but {len(body) - _MIN_BODY} "
                         "payload bytes", seq, msg_type, epoch)
    try:
        kind = MessageType(msg_type)
    except ValueError:
        raise FrameError(NakCode.UNKNOWN_TYPE, f"message type 0x{msg_type:02X}", seq, msg_type, epoch) from None
    return Frame(kind, seq, body[_HEADER.size:-_CRC.size], epoch)


def verdict_frame(seq: int, part_id: str, verdict: Verdict, reason: Reason, flags: int = 0, *,
                  epoch: int = 0) -> Frame:
    """A VERDICT message; raises ValueError naming any field that does not fit the wire format."""
    part_bytes = part_id.encode("utf-8")
    if not part_bytes or len(part_bytes) > MAX_PART_ID_BYTES:
        raise ValueError(f"part_id {part_id!r} must be 1..{MAX_PART_ID_BYTES} bytes of UTF-8")
    if not isinstance(verdict, Verdict):
        raise ValueError(f"verdict {verdict!r} is not a musc_edge.edge.record.Verdict")
    reason = _reason(reason)
    return Frame(MessageType.VERDICT, seq, bytes((flags, VerdictCode.of(verdict), reason)) + part_bytes, epoch)


def _reason(reason: Reason | int) -> Reason:
    try:
        return Reason(reason)
    except ValueError:
        raise ValueError(f"reason {reason!r} is not a musc_edge.edge.record.Reason code") from None


def parse_verdict(frame: Frame) -> VerdictMessage:
    """Fields of a VERDICT frame; raises FrameError(BAD_FORMAT) on an invalid field.

    An unknown reason code is kept as an int (codes may be added); an invalid verdict code is an error.
    """
    payload = frame.payload
    if len(payload) < 4:
        raise FrameError(NakCode.BAD_FORMAT, f"verdict payload of {len(payload)} bytes, need >= 4",
                         frame.seq, frame.type, frame.epoch)
    flags, verdict_code, reason_code = payload[0], payload[1], payload[2]
    try:
        verdict = VerdictCode(verdict_code).to_verdict()
        reason = Reason(reason_code) if reason_code in _KNOWN_REASONS else reason_code
        part_id = payload[3:].decode("utf-8")
    except ValueError as exc:
        raise FrameError(NakCode.BAD_FORMAT, f"verdict payload: {exc}", frame.seq, frame.type,
                         frame.epoch) from None
    return VerdictMessage(frame.seq, part_id, verdict, reason, flags, frame.epoch)


def heartbeat_frame(counter: int, pending: int, *, epoch: int = 0) -> Frame:
    """A HEARTBEAT message; ``pending`` = verdicts waiting for an ack (saturates at 65535)."""
    return Frame(MessageType.HEARTBEAT, counter & MAX_SEQ, struct.pack(">H", min(pending, 0xFFFF)), epoch)


def stop_line_frame(counter: int, reason: str, *, epoch: int = 0) -> Frame:
    """A STOP_LINE message; ``reason`` is cut to 255 bytes of UTF-8 (at a character boundary)."""
    text = reason.encode("utf-8", "replace")[:255].decode("utf-8", "ignore").encode("utf-8")
    return Frame(MessageType.STOP_LINE, counter & MAX_SEQ, text, epoch)


def epoch_frame(epoch: int) -> Frame:
    """An EPOCH message: announces the line epoch (seq 0, no payload); the PLC starts a new de-duplication
    record for it and ACKs; the runtime sends no verdict before that ACK."""
    if not 1 <= epoch <= MAX_EPOCH:
        raise ValueError(f"line epoch {epoch} is outside 1..{MAX_EPOCH}")
    return Frame(MessageType.EPOCH, 0, b"", epoch)


def parse_stop_line(frame: Frame) -> str:
    """The reason of a STOP_LINE frame (undecodable bytes replaced, never an error: stopping matters more)."""
    return frame.payload.decode("utf-8", "replace")


def ack_frame(seq: int, acked_type: MessageType, *, epoch: int = 0) -> Frame:
    """The PLC's ACK: ``seq`` and ``epoch`` copied from the message it answers."""
    return Frame(MessageType.ACK, seq, bytes((acked_type,)), epoch)


def nak_frame(seq: int, refused_type: int, code: NakCode, *, epoch: int = 0) -> Frame:
    """The PLC's NAK: ``seq`` and ``epoch`` copied from the message it refuses (as far as it could read them)."""
    return Frame(MessageType.NAK, seq, bytes((refused_type & 0xFF, code)), epoch)


def reply_target(frame: Frame) -> tuple[int, int | None]:
    """(acknowledged type, NAK code or None) of an ACK or NAK frame; BAD_FORMAT if too short."""
    need = 1 if frame.type is MessageType.ACK else 2
    if len(frame.payload) < need:
        raise FrameError(NakCode.BAD_FORMAT, f"{frame.type.name} payload of {len(frame.payload)} bytes",
                         frame.seq, frame.type, frame.epoch)
    return frame.payload[0], (frame.payload[1] if frame.type is MessageType.NAK else None)


def stream_frame(body: bytes) -> bytes:
    """Bytes to write on a byte stream: a leading delimiter flushes any partial frame at the receiver."""
    return b"\x00" + cobs_encode(body) + b"\x00"


class StreamDeframer:
    """Splits a byte stream into bodies at 0x00 delimiters. Not thread-safe: one per reader."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._overflow = False

    def feed(self, data: bytes) -> list[bytes | FrameError]:
        """Bodies (COBS-decoded, not yet checked) completed by ``data``; broken frames as FrameError."""
        out: list[bytes | FrameError] = []
        start = 0
        end = data.find(b"\x00")
        while end != -1:
            self._append(data[start:end])
            if self._overflow:
                out.append(FrameError(NakCode.BAD_FORMAT, f"frame longer than {_MAX_ENCODED_BYTES} bytes"))
            elif self._buffer:
                try:
                    out.append(cobs_decode(bytes(self._buffer)))
                except FrameError as exc:
                    out.append(exc)
            self._buffer.clear()
            self._overflow = False
            start = end + 1
            end = data.find(b"\x00", start)
        self._append(data[start:])
        return out

    def _append(self, chunk: bytes) -> None:
        if self._overflow:
            return
        if len(self._buffer) + len(chunk) > _MAX_ENCODED_BYTES:
            self._overflow = True
            self._buffer.clear()
        else:
            self._buffer += chunk
