"""The verdict register map shared by the Modbus links and their PLC simulator (docs/wire-protocol.md).

The runtime is the Modbus *server* (RTU: the slave): it publishes each verdict into a block of holding
registers and raises NEW_VERDICT; the PLC, as the client (RTU: the master) it already is towards its
other field devices, polls the block and writes the sequence number back to ACK_SEQ. Every verdict carries
the line EPOCH (a random id of the runtime's ledger), which the PLC acknowledges in EPOCH_ACK before the
first verdict is published, so it de-duplicates on (EPOCH, SEQ). 32-bit values
take two registers, high word first. Addresses are 0-based protocol addresses (add 40001 for the
"4xxxx" reference numbers some PLC tools show).

:class:`RegisterImage` is the runtime's copy of the block: thread-safe, written whole by the link
(so a PLC read never sees half a verdict) and told of every PLC write. An acknowledgement counts only as an
*event*: a write of the published value after its publication (ACK_SEQ = SEQ, HEARTBEAT_ECHO = the heartbeat
nonce, EPOCH_ACK = EPOCH, STOP_ACK = STOP_COUNT); a value already in a register, or an ACK_SEQ ahead of
what was published, acknowledges nothing.
"""
from __future__ import annotations

import secrets
import threading
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Sequence

MAP_VERSION = 2             # 2: EPOCH / EPOCH_ACK, the heartbeat is a nonce, HEARTBEAT_COUNT
PART_TEXT_BYTES = 64


class Reg(IntEnum):
    """Holding register addresses (0-based). 0..19: written by the runtime, read-only to the PLC."""

    MAP_VERSION = 0         # layout version of this map (2)
    HEARTBEAT = 1           # a new random non-zero nonce every link.heartbeat_interval_s (never the previous one)
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
    EPOCH_HI = 15           # the line epoch, 32 bits (random, non-zero; a new install has another one)
    EPOCH_LO = 16
    HEARTBEAT_COUNT = 17    # +1 per heartbeat (wraps at 65535): gaps show lost heartbeats
    # 18..19 reserved (read as 0)
    ACK_SEQ_HI = 20         # PLC -> runtime: the SEQ it took (write both words in one FC16)
    ACK_SEQ_LO = 21
    HEARTBEAT_ECHO = 22     # PLC -> runtime: copy of HEARTBEAT (answers the heartbeat)
    NAK_SEQ_HI = 23         # PLC -> runtime: a SEQ it refuses ...
    NAK_SEQ_LO = 24
    NAK_CODE = 25           # ... and why (NakCode: 2 bad format, 4 busy); one FC16 for 23..25
    STOP_ACK = 26           # PLC -> runtime: copy of STOP_COUNT once the line is stopping
    EPOCH_ACK_HI = 27       # PLC -> runtime: copy of EPOCH once it keeps a new de-duplication record for it
    EPOCH_ACK_LO = 28       # (both words in one FC16)
    # 29..31 reserved
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
    epoch: int = 0          # the line epoch it belongs to


@dataclass
class PlcEvents:
    """What the PLC acknowledged since the runtime last published each value (None: nothing yet)."""

    acked_seq: int | None = None          # ACK_SEQ written equal to the published SEQ
    nak: tuple[int, int] | None = None    # (seq, code): NAK_SEQ + NAK_CODE written for the published SEQ
    echoed: int | None = None             # HEARTBEAT_ECHO written equal to the heartbeat nonce
    epoch_acked: int | None = None        # EPOCH_ACK written equal to EPOCH
    stop_acked: int | None = None         # STOP_ACK written equal to STOP_COUNT


class WriteRefused(ValueError):
    """A PLC write the image does not take; ``outside`` when it touches registers that are not the PLC's."""

    def __init__(self, text: str, outside: bool = False) -> None:
        super().__init__(text)
        self.outside = outside

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
        calibration=registers[Reg.CALIBRATION], epoch=join32(registers[Reg.EPOCH_HI], registers[Reg.EPOCH_LO]))


def seq_after(seq: int, reference: int) -> bool:
    """RFC 1982 serial-number order on 32 bits: ``seq`` comes after ``reference``."""
    return 0 < (seq - reference) % 0x100000000 < 0x80000000


def new_nonce(previous: int) -> int:
    """A random register value in 1..65535 other than ``previous``."""
    while (nonce := secrets.randbelow(0xFFFF) + 1) == previous:
        pass
    return nonce


class RegisterImage:
    """The runtime's register block. Link-side writes are whole updates under one lock; PLC writes to
    registers outside 20..31 are refused; every PLC write wakes :meth:`wait_for_plc`."""

    def __init__(self) -> None:
        self._values = [0] * REGISTER_COUNT
        self._values[Reg.MAP_VERSION] = MAP_VERSION
        self._changed = threading.Condition()
        self._plc_writes = 0
        self._published = False               # a verdict is in SEQ (ACK_SEQ can refer to it)
        self.events = PlcEvents()

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
        """Set several registers at once (the runtime's side). A changed HEARTBEAT, EPOCH or STOP_COUNT forgets
        the PLC's earlier answer to it (it must be written again); a changed EPOCH also zeroes EPOCH_ACK."""
        with self._changed:
            v = self._values
            before = list(v)
            for address, value in values.items():
                v[address] = value & 0xFFFF

            def changed(*registers: int) -> bool:
                return any(v[register] != before[register] for register in registers)

            if changed(Reg.HEARTBEAT):
                self.events.echoed = None
            if changed(Reg.EPOCH_HI, Reg.EPOCH_LO):
                self.events.epoch_acked = None
                v[Reg.EPOCH_ACK_HI] = v[Reg.EPOCH_ACK_LO] = 0
            if changed(Reg.STOP_COUNT):
                self.events.stop_acked = None

    def plc_write(self, address: int, values: Sequence[int]) -> None:
        """Apply a write from the PLC and note what it acknowledges; WriteRefused (nothing written) for a
        write outside the PLC's registers 20..31 or an ACK_SEQ ahead of the published SEQ.

        An ACK_SEQ equal to SEQ, written while the verdict is new and its EPOCH acknowledged, clears
        NEW_VERDICT in the same step, so the PLC's next poll never shows an acknowledged verdict as new.
        """
        end = address + len(values)
        if address < FIRST_PLC_REGISTER or end - 1 > LAST_PLC_REGISTER or not values:
            raise WriteRefused(f"registers {address}..{end - 1} are not the PLC's ({FIRST_PLC_REGISTER}.."
                               f"{LAST_PLC_REGISTER})", outside=True)

        def touches(*registers: int) -> bool:
            return any(address <= register < end for register in registers)

        with self._changed:
            v, events = self._values, self.events
            new = list(v)
            new[address:end] = [int(value) & 0xFFFF for value in values]
            seq, epoch = join32(v[Reg.SEQ_HI], v[Reg.SEQ_LO]), join32(v[Reg.EPOCH_HI], v[Reg.EPOCH_LO])
            if touches(Reg.ACK_SEQ_HI, Reg.ACK_SEQ_LO):
                ack = join32(new[Reg.ACK_SEQ_HI], new[Reg.ACK_SEQ_LO])
                if ack != seq and (not self._published or seq_after(ack, seq)):
                    raise WriteRefused(f"ACK_SEQ {ack} is ahead of the published SEQ "
                                       f"{seq if self._published else '(none yet)'}")
            v[address:end] = new[address:end]
            if touches(Reg.EPOCH_ACK_HI, Reg.EPOCH_ACK_LO) and epoch and \
                    join32(v[Reg.EPOCH_ACK_HI], v[Reg.EPOCH_ACK_LO]) == epoch:
                events.epoch_acked = epoch
            epoch_known = epoch != 0 and events.epoch_acked == epoch
            if touches(Reg.ACK_SEQ_HI, Reg.ACK_SEQ_LO) and v[Reg.NEW_VERDICT] and epoch_known and \
                    join32(v[Reg.ACK_SEQ_HI], v[Reg.ACK_SEQ_LO]) == seq:
                events.acked_seq = seq
                v[Reg.NEW_VERDICT] = 0
            if touches(Reg.NAK_SEQ_HI, Reg.NAK_SEQ_LO, Reg.NAK_CODE) and v[Reg.NEW_VERDICT] and v[Reg.NAK_CODE] \
                    and join32(v[Reg.NAK_SEQ_HI], v[Reg.NAK_SEQ_LO]) == seq:
                events.nak = (seq, v[Reg.NAK_CODE])
            if touches(Reg.HEARTBEAT_ECHO) and v[Reg.HEARTBEAT] and v[Reg.HEARTBEAT_ECHO] == v[Reg.HEARTBEAT]:
                events.echoed = v[Reg.HEARTBEAT]
            if touches(Reg.STOP_ACK) and v[Reg.STOP_COUNT] and v[Reg.STOP_ACK] == v[Reg.STOP_COUNT]:
                events.stop_acked = v[Reg.STOP_COUNT]
            self._plc_writes += 1
            self._changed.notify_all()

    def publish(self, verdict: PublishedVerdict) -> None:
        """Put a verdict in the block and raise NEW_VERDICT; only an ACK_SEQ written from now on acknowledges it.

        NAK registers are left alone: the link clears them as it reads each refusal.
        """
        with self._changed:
            v = self._values
            again = self._published and join32(v[Reg.SEQ_HI], v[Reg.SEQ_LO]) == verdict.seq \
                and self.events.acked_seq == verdict.seq            # re-published after the PLC took it
            if verdict.epoch:
                v[Reg.EPOCH_HI], v[Reg.EPOCH_LO] = split32(verdict.epoch)
            v[Reg.SEQ_HI], v[Reg.SEQ_LO] = split32(verdict.seq)
            v[Reg.VERDICT], v[Reg.REASON], v[Reg.FLAGS] = verdict.verdict, verdict.reason, verdict.flags
            v[Reg.PART_HASH_HI], v[Reg.PART_HASH_LO] = split32(part_hash(verdict.part_id))
            v[Reg.CALIBRATION] = verdict.calibration
            v[Reg.PART_TEXT:Reg.PART_TEXT + PART_TEXT_BYTES // 2] = part_text_registers(verdict.part_id)
            v[Reg.NEW_VERDICT] = int(not again)
            self._published = True
            if not again:
                self.events.acked_seq = None
            if self.events.nak is not None and self.events.nak[0] != verdict.seq:
                self.events.nak = None
            if v[Reg.LINE_STATE] == LineState.STARTING:
                v[Reg.LINE_STATE] = LineState.RUNNING

    def wait_for_plc(self, predicate, timeout_s: float):
        """Block until ``predicate(registers, events)`` returns something truthy (checked at once and after
        every PLC write, under the image's lock: it may reset what it consumed); that value, or None when
        ``timeout_s`` passes."""
        with self._changed:
            result = None

            def check() -> bool:
                nonlocal result
                result = predicate(self._values, self.events)
                return bool(result)

            self._changed.wait_for(check, timeout_s)
            return result
