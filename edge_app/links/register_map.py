"""The verdict register map shared by the Modbus links and their PLC simulator (docs/wire-protocol.md).

The runtime is the Modbus *server* (RTU: the slave): it publishes each verdict into a block of holding
registers and raises NEW_VERDICT; the PLC, as the client (RTU: the master) it already is towards its
other field devices, polls the block and writes the sequence number back to ACK_SEQ. 32-bit values
take two registers, high word first. Addresses are 0-based protocol addresses (add 40001 for the
"4xxxx" reference numbers some PLC tools show).

:class:`RegisterImage` is the runtime's copy of the block: thread-safe, written whole by the link
(so a PLC read never sees half a verdict) and told of every PLC write.
"""
from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence

MAP_VERSION = 1
PART_TEXT_BYTES = 64


class Reg(IntEnum):
    """Holding register addresses (0-based). 0..19: written by the runtime, read-only to the PLC."""

    MAP_VERSION = 0         # layout version of this map (1)
    HEARTBEAT = 1           # +1 every link.heartbeat_interval_s (wraps at 65535)
    LINE_STATE = 2          # LineState
    PENDING = 3             # verdicts waiting for an ACK (saturates at 65535)
    NEW_VERDICT = 4         # 1: registers 5..12 hold a verdict not yet acknowledged; 0 after ACK_SEQ
    SEQ_HI = 5              # verdict sequence number, 32 bits (ledger row id modulo 2**32)
    SEQ_LO = 6
    VERDICT = 7             # 1 ACCEPT, 2 REJECT, 3 NO_VERDICT (apply the fail-safe: reject)
    REASON = 8              # reason code (docs/wire-protocol.md), 0 = ok
    FLAGS = 9               # bit 0 LATE (past the part's deadline), bit 1 RESEND (after a restart)
    PART_HASH_HI = 10       # CRC-32 of the part id's UTF-8 bytes
    PART_HASH_LO = 11
    CALIBRATION = 12        # calibration version (65535 if not a number below 65535)
    STOP_LINE = 13          # 1: the runtime asks the PLC to stop the line
    STOP_COUNT = 14         # +1 per stop-line request (wraps at 65535)
    # 15..19 reserved (read as 0)
    ACK_SEQ_HI = 20         # PLC -> runtime: the SEQ it took (write both words in one FC16)
    ACK_SEQ_LO = 21
    HEARTBEAT_ECHO = 22     # PLC -> runtime: copy of HEARTBEAT (answers the heartbeat)
    NAK_SEQ_HI = 23         # PLC -> runtime: a SEQ it refuses ...
    NAK_SEQ_LO = 24
    NAK_CODE = 25           # ... and why (NakCode: 2 bad format, 4 busy); one FC16 for 23..25
    STOP_ACK = 26           # PLC -> runtime: copy of STOP_COUNT once the line is stopping
    # 27..31 reserved
    PART_TEXT = 32          # 32 registers: the part id, UTF-8, two bytes a register, zero padded
    STOP_TEXT = 64          # 32 registers: why the line must stop, UTF-8 like PART_TEXT


FIRST_PLC_REGISTER = Reg.ACK_SEQ_HI
LAST_PLC_REGISTER = 31
REGISTER_COUNT = Reg.STOP_TEXT + PART_TEXT_BYTES // 2        # 96: one FC3 read (at most 125)


class LineState(IntEnum):
    STARTING = 0            # link open, nothing published yet
    RUNNING = 1
    STOP_REQUESTED = 2      # see STOP_LINE / STOP_REASON


@dataclass(frozen=True)
class PublishedVerdict:
    seq: int                # 32-bit wire seq
    verdict: int            # VerdictCode
    reason: int
    flags: int
    part_id: str
    calibration: int


def split32(value: int) -> list[int]:
    return [(value >> 16) & 0xFFFF, value & 0xFFFF]


def join32(high: int, low: int) -> int:
    return ((high & 0xFFFF) << 16) | (low & 0xFFFF)


def part_hash(part_id: str) -> int:
    """CRC-32 (zlib, IEEE 802.3) of the part id's UTF-8 bytes."""
    return zlib.crc32(part_id.encode("utf-8")) & 0xFFFFFFFF


def part_text_registers(text: str) -> list[int]:
    """``text`` as 32 registers: UTF-8, cut to 64 bytes at a character boundary, zero padded."""
    raw = text.encode("utf-8")[:PART_TEXT_BYTES].decode("utf-8", "ignore").encode("utf-8")
    raw = raw.ljust(PART_TEXT_BYTES, b"\x00")
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, PART_TEXT_BYTES, 2)]


def part_text(registers: Sequence[int]) -> str:
    raw = b"".join(int(value).to_bytes(2, "big") for value in registers)
    return raw.rstrip(b"\x00").decode("utf-8", errors="replace")


def calibration_register(version: str | int) -> int:
    """The calibration version as one register: the number itself, else 65535."""
    try:
        number = int(version)
    except (TypeError, ValueError):
        return 0xFFFF
    return number if 0 <= number < 0xFFFF else 0xFFFF


def decode_verdict(registers: Sequence[int]) -> PublishedVerdict:
    """The verdict fields of a full block read (registers 0..95)."""
    return PublishedVerdict(
        seq=join32(registers[Reg.SEQ_HI], registers[Reg.SEQ_LO]), verdict=registers[Reg.VERDICT],
        reason=registers[Reg.REASON], flags=registers[Reg.FLAGS],
        part_id=part_text(registers[Reg.PART_TEXT:Reg.PART_TEXT + PART_TEXT_BYTES // 2]),
        calibration=registers[Reg.CALIBRATION])


class RegisterImage:
    """The runtime's register block. Link-side writes are whole updates under one lock; PLC writes to
    registers outside 20..31 are refused; every PLC write wakes :meth:`wait_for_plc`."""

    def __init__(self) -> None:
        self._values = [0] * REGISTER_COUNT
        self._values[Reg.MAP_VERSION] = MAP_VERSION
        self._changed = threading.Condition()
        self._plc_writes = 0

    def snapshot(self) -> list[int]:
        with self._changed:
            return list(self._values)

    def read(self, address: int, count: int) -> list[int] | None:
        """Registers ``address .. address+count-1``; None if outside the map."""
        if address < 0 or address + count > REGISTER_COUNT:
            return None
        with self._changed:
            return self._values[address:address + count]

    def update(self, values: dict[int, int]) -> None:
        """Set several registers at once (the runtime's side)."""
        with self._changed:
            for address, value in values.items():
                self._values[address] = value & 0xFFFF

    def plc_write(self, address: int, values: Sequence[int]) -> bool:
        """Apply a write from the PLC; False (refused) outside the PLC's registers 20..31.

        An ACK_SEQ equal to SEQ clears NEW_VERDICT in the same step, so the PLC's next poll never
        shows an acknowledged verdict as new.
        """
        if address < FIRST_PLC_REGISTER or address + len(values) - 1 > LAST_PLC_REGISTER:
            return False
        with self._changed:
            self._values[address:address + len(values)] = [int(v) & 0xFFFF for v in values]
            v = self._values
            if v[Reg.NEW_VERDICT] and (v[Reg.ACK_SEQ_HI], v[Reg.ACK_SEQ_LO]) == (v[Reg.SEQ_HI], v[Reg.SEQ_LO]):
                v[Reg.NEW_VERDICT] = 0
            self._plc_writes += 1
            self._changed.notify_all()
        return True

    def publish(self, verdict: PublishedVerdict) -> None:
        """Put a verdict in the block and raise NEW_VERDICT (unless the PLC already acked this seq).

        NAK registers are left alone: the link clears them as it reads each refusal.
        """
        with self._changed:
            v = self._values
            v[Reg.SEQ_HI], v[Reg.SEQ_LO] = split32(verdict.seq)
            v[Reg.VERDICT], v[Reg.REASON], v[Reg.FLAGS] = verdict.verdict, verdict.reason, verdict.flags
            v[Reg.PART_HASH_HI], v[Reg.PART_HASH_LO] = split32(part_hash(verdict.part_id))
            v[Reg.CALIBRATION] = verdict.calibration
            v[Reg.PART_TEXT:Reg.PART_TEXT + PART_TEXT_BYTES // 2] = part_text_registers(verdict.part_id)
            v[Reg.NEW_VERDICT] = int(join32(v[Reg.ACK_SEQ_HI], v[Reg.ACK_SEQ_LO]) != verdict.seq)
            if v[Reg.LINE_STATE] == LineState.STARTING:
                v[Reg.LINE_STATE] = LineState.RUNNING

    def wait_for_plc(self, predicate, timeout_s: float):
        """Block until ``predicate(registers)`` returns something truthy (checked at once and after
        every PLC write); that value, or None when ``timeout_s`` passes."""
        with self._changed:
            result = None

            def check() -> bool:
                nonlocal result
                result = predicate(self._values)
                return bool(result)

            self._changed.wait_for(check, timeout_s)
            return result
