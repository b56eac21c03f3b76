"""Reject links over real transports on loopback (pty serial, ZeroMQ tcp) against the PLC simulator."""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from musc_edge.edge.links import LinkClosedError, RejectLink, open_link, parse_link_config
from musc_edge.edge.links.framing import (
    Frame,
    FrameError,
    MessageType,
    NakCode,
    StreamDeframer,
    VerdictFlags,
    ack_frame,
    cobs_decode,
    cobs_encode,
    crc16,
    decode_body,
    encode_body,
    heartbeat_frame,
    nak_frame,
    parse_verdict,
    stream_frame,
    verdict_frame,
)
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import Reason, Verdict

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-protocol.md"
FAST = dict(ack_timeout_s=0.05, heartbeat_interval_s=0.1, silence_alarm_s=0.3,
            backoff_initial_s=0.05, backoff_max_s=0.2)
TRANSPORTS = ("serial", "zmq")


class Events:
    """Collects link callbacks; lets a test wait for a number of acks."""

    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []
        self.alarms: list[str] = []
        self.cleared: list[str] = []
        self._changed = threading.Condition()

    def on_ack(self, seq: int, late: bool) -> None:
        with self._changed:
            self.acks.append((seq, late))
            self._changed.notify_all()

    def on_alarm(self, text: str) -> None:
        self.alarms.append(text)

    def on_cleared(self, text: str) -> None:
        self.cleared.append(text)

    def wait_acks(self, count: int, timeout_s: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.acks) >= count, timeout_s)


def _sim(transport: str, **options: Any) -> PlcSimulator:
    return PlcSimulator.on_pty(**options) if transport == "serial" else \
        PlcSimulator.on_zmq("tcp://127.0.0.1:*", **options)


def _link_config(transport: str, address: str, **settings: Any) -> dict[str, Any]:
    key = "url" if transport == "serial" else "endpoint"
    return {"type": transport, key: address, **FAST, **settings}


@contextmanager
def linked(transport: str, settings: dict[str, Any] | None = None,
           **sim_options: Any) -> Iterator[tuple[RejectLink, PlcSimulator, Events]]:
    events = Events()
    with _sim(transport, **sim_options) as sim:
        with open_link(_link_config(transport, sim.address, **(settings or {})), on_ack=events.on_ack,
                       on_alarm=events.on_alarm, on_alarm_cleared=events.on_cleared) as link:
            yield link, sim, events


def _soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


# --------------------------------------------------------------------------------- framing

def test_crc16_is_ccitt_false_with_the_documented_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1


ROUND_TRIP = [
    verdict_frame(0, "P-0001", Verdict.ACCEPT, Reason.OK),
    verdict_frame(4_294_967_295, "Teil-Ä/7", Verdict.REJECT, Reason.ANOMALY, VerdictFlags.LATE),
    verdict_frame(0x00000100, "x" * 64, Verdict.NO_VERDICT, Reason.SCANNER_ERROR, VerdictFlags.RESEND),
    heartbeat_frame(7, pending=70000),
    ack_frame(12, MessageType.VERDICT),
    nak_frame(12, MessageType.VERDICT, NakCode.BUSY),
]


@pytest.mark.parametrize("frame", ROUND_TRIP, ids=lambda f: f"{f.type.name}-{f.seq}")
def test_frames_survive_encoding_and_a_byte_stream(frame: Frame) -> None:
    wire = stream_frame(encode_body(frame))
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    deframer = StreamDeframer()
    bodies = [b for i in range(len(wire)) for b in deframer.feed(wire[i:i + 1])]   # byte by byte
    assert [decode_body(b) for b in bodies] == [frame]


def test_verdict_fields_round_trip() -> None:
    frame = decode_body(encode_body(verdict_frame(99, "Teil-Ä/7", Verdict.REJECT, Reason.DEADLINE,
                                                  VerdictFlags.LATE)))
    message = parse_verdict(frame)
    assert (message.seq, message.part_id, message.verdict, message.reason, message.flags) == \
        (99, "Teil-Ä/7", Verdict.REJECT, Reason.DEADLINE, VerdictFlags.LATE)


def _body() -> bytearray:
    return bytearray(encode_body(verdict_frame(5, "P1", Verdict.REJECT, Reason.ANOMALY, epoch=0x1A2B3C4D)))


def _flip(index: int, bit: int = 0) -> bytes:
    body = _body()
    body[index] ^= 1 << bit
    return bytes(body)


def _with_crc(body: bytearray) -> bytes:
    return bytes(body[:-2]) + crc16(bytes(body[:-2])).to_bytes(2, "big")


CORRUPTIONS = [      # header: version 0, type 1, epoch 2..5, seq 6..9, length 10; payload: flags 11, verdict 12 ...
    ("version bit", _flip(0), NakCode.BAD_CRC),
    ("type bit", _flip(1, 3), NakCode.BAD_CRC),
    ("epoch bit", _flip(3, 4), NakCode.BAD_CRC),
    ("seq bit", _flip(9, 7), NakCode.BAD_CRC),
    ("length bit", _flip(10, 1), NakCode.BAD_CRC),
    ("verdict bit", _flip(12, 0), NakCode.BAD_CRC),
    ("part id bit", _flip(14, 5), NakCode.BAD_CRC),
    ("crc bit", _flip(-1, 2), NakCode.BAD_CRC),
    ("verdict and reason swapped", bytes(_body()[:12] + _body()[13:14] + _body()[12:13] + _body()[14:]),
     NakCode.BAD_CRC),
    ("truncated", bytes(_body()[:-3]), NakCode.BAD_CRC),
    ("too short", bytes(_body()[:12]), NakCode.BAD_FORMAT),
    ("wrong version", _with_crc(bytearray(b"\x01") + _body()[1:]), NakCode.BAD_FORMAT),
    ("length field lies", _with_crc(_body()[:10] + bytearray(b"\x09") + _body()[11:]), NakCode.BAD_FORMAT),
    ("unknown type", _with_crc(_body()[:1] + bytearray(b"\x7f") + _body()[2:]), NakCode.UNKNOWN_TYPE),
]


@pytest.mark.parametrize("name,body,code", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_damaged_bodies_are_refused_with_the_right_nak_code(name: str, body: bytes, code: NakCode) -> None:
    with pytest.raises(FrameError) as caught:
        decode_body(body)
    assert caught.value.code is code


def test_every_single_bit_error_is_detected() -> None:
    body = bytes(_body())
    for index in range(len(body)):
        for bit in range(8):
            damaged = bytearray(body)
            damaged[index] ^= 1 << bit
            with pytest.raises(FrameError):
                decode_body(bytes(damaged))


@pytest.mark.parametrize("size", [0, 1, 253, 254, 255, 508, 700])
def test_cobs_round_trips_zero_heavy_and_long_data(size: int) -> None:
    data = bytes((i * 7) % 3 for i in range(size))       # about a third zeros
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert cobs_decode(encoded) == data


def test_deframer_resynchronises_after_garbage_and_reports_broken_frames() -> None:
    good = [encode_body(heartbeat_frame(n, 0)) for n in (1, 2)]
    stream = b"\x13\x37garbage" + stream_frame(good[0]) + b"\x05\x01\x00" + stream_frame(good[1])
    items = StreamDeframer().feed(stream)
    bodies = [i for i in items if isinstance(i, bytes)]
    assert [decode_body(b).seq for b in bodies if _decodes(b)] == [1, 2]
    assert any(isinstance(i, FrameError) for i in items)            # the 0x05 block overruns
    overlong = StreamDeframer().feed(b"\x01" * 2000 + b"\x00" + stream_frame(good[0]))
    assert isinstance(overlong[0], FrameError) and decode_body(overlong[1]).seq == 1


def _decodes(body: bytes) -> bool:
    try:
        decode_body(body)
    except FrameError:
        return False
    return True


@pytest.mark.parametrize("bad,field", [
    (dict(part_id=""), "part_id"), (dict(part_id="x" * 65), "part_id"),
    (dict(reason=42), "reason"), (dict(verdict="REJECT"), "verdict")])
def test_verdict_fields_that_do_not_fit_are_named(bad: dict[str, Any], field: str) -> None:
    args = dict(seq=1, part_id="P1", verdict=Verdict.REJECT, reason=Reason.OK) | bad
    with pytest.raises(ValueError, match=field):
        verdict_frame(**args)


def test_documented_hex_example_matches_the_encoder() -> None:
    if not DOC.exists():
        pytest.skip("docs/wire-protocol.md not present")
    text = DOC.read_text(encoding="utf-8")
    body_hex = re.search(r"^Body:\s+((?:[0-9A-F]{2} ?)+)$", text, re.M)
    wire_hex = re.search(r"^On the serial line:\s+((?:[0-9A-F]{2} ?)+)$", text, re.M)
    assert body_hex and wire_hex, "worked example lines not found in docs/wire-protocol.md"
    body = encode_body(verdict_frame(1234, "P-0042", Verdict.REJECT, Reason.ANOMALY, epoch=0x1A2B3C4D))
    assert bytes.fromhex(body_hex.group(1)) == body
    assert bytes.fromhex(wire_hex.group(1)) == stream_frame(body)


# --------------------------------------------------------------------------------- config

@pytest.mark.parametrize("raw,named", [
    ({"type": "can"}, "link.type"),
    ({"url": "/dev/ttyTHS1"}, "link.type"),
    ({"type": "serial"}, "link.url"),
    ({"type": "serial", "url": "loop://", "ack_timeout_s": 0}, "link.ack_timeout_s"),
    ({"type": "zmq", "hwm": 5}, "link.hwm"),
    ({"type": "zmq", "heartbeat_interval_s": 5.0}, "silence_alarm_s"),
])
def test_bad_link_config_names_the_key(raw: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_link_config(raw)


def test_bad_serial_url_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="nosuch://x"):
        open_link({"type": "serial", "url": "nosuch://x"})


# --------------------------------------------------------------------------------- delivery

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_verdict_is_acked_and_logged_once(transport: str) -> None:
    with linked(transport) as (link, sim, events):
        result = link.send(17, "P-17", Verdict.REJECT, Reason.ANOMALY, _soon())
        assert result.acked and result.attempts >= 1 and result.error is None
        assert events.acks == [(17, False)]
        [got] = sim.received()
        assert (got.seq, got.part_id, got.verdict, got.reason, got.late) == (17, "P-17", "REJECT", 1, False)
        health = link.health()
        assert health.connected and health.outbox_depth == 0 and health.acked == 1 and not health.alarms


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nak_is_retried_until_acked(transport: str) -> None:
    with linked(transport) as (link, sim, events):
        sim.refuse_next(2, NakCode.BUSY)
        result = link.send(1, "P-1", Verdict.ACCEPT, Reason.OK, _soon())
        assert result.acked and result.attempts == 3
        assert link.health().naks == 2 and sim.counters().naks_sent == 2
        assert [r.seq for r in sim.received()] == [1]


def test_a_plc_that_keeps_refusing_raises_an_alarm_until_it_takes_the_verdict() -> None:
    with linked("zmq", dict(max_attempts=3)) as (link, sim, events):
        sim.refuse_next(1000, NakCode.BAD_FORMAT)
        result = link.send(7, "P-7", Verdict.REJECT, Reason.ANOMALY, _soon(0.3))
        assert not result.acked and "NAK BAD_FORMAT" in (result.error or "")
        assert any("PLC refuses seq 7" in text for text in link.health().alarms)
        sim.refuse_next(0)
        assert events.wait_acks(1)
        assert events.acks == [(7, True)] and link.health().alarms == ()
        assert any("PLC took seq 7" in text for text in events.cleared)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_plc_silence_delivers_everything_once_in_order_and_reports_late_acks(transport: str) -> None:
    with linked(transport, silent_after=3, silent_for_s=0.8) as (link, sim, events):
        results = {seq: link.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, _soon(0.1))
                   for seq in range(1, 11)}
        assert events.wait_acks(10)
        assert [r.seq for r in sim.received()] == list(range(1, 11))
        assert sim.counters().out_of_order == 0
        assert sorted(events.acks) == [(seq, not results[seq].acked) for seq in range(1, 11)]
        assert all(results[seq].acked for seq in (1, 2, 3))
        assert not results[4].acked and "not acked by the deadline" in (results[4].error or "")
        assert any(r.late for r in sim.received())                 # LATE flag reached the PLC
        assert any("PLC silent" in text for text in events.alarms)
        assert any("answering again" in text for text in events.cleared)
        health = link.health()
        assert health.alarms == () and health.outbox_depth == 0 and health.late_acks >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_corrupted_frames_are_retried_without_loss_or_duplicate_logging(transport: str) -> None:
    settings = dict(heartbeat_interval_s=1.0, silence_alarm_s=3.0, max_attempts=10)
    with linked(transport, settings, corrupt_rate=0.25, seed=7) as (link, sim, events):
        for seq in range(1, 31):
            link.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, _soon(1.0))
        assert events.wait_acks(30)
        assert [r.seq for r in sim.received()] == list(range(1, 31))
        counters, health = sim.counters(), link.health()
        assert counters.out_of_order == 0
        assert counters.crc_errors > 0 and counters.corrupted_replies > 0
        assert health.retries > 0 and health.bad_frames > 0
        assert counters.duplicates > 0          # a damaged ACK makes the runtime repeat a verdict
        assert sorted(seq for seq, _ in events.acks) == list(range(1, 31))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_heartbeats_arrive_at_about_the_configured_rate(transport: str) -> None:
    with linked(transport, dict(heartbeat_interval_s=0.05, silence_alarm_s=0.5)) as (link, sim, _):
        assert sim.wait_for(lambda c: c.heartbeats >= 3, 5.0)
        start = sim.counters().heartbeats
        time.sleep(1.0)
        counted = sim.counters().heartbeats - start
        assert 8 <= counted <= 30, counted                 # ~20 expected at 0.05 s
        assert sim.counters().heartbeat_gaps == 0
        assert link.health().heartbeats_acked >= 8


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_resend_after_restart_is_deduplicated_by_the_plc(transport: str) -> None:
    with _sim(transport) as sim:
        config = _link_config(transport, sim.address)
        with open_link(config, epoch=0x5EED) as first:
            for seq in (1, 2, 3):
                assert first.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, _soon()).acked
        events = Events()
        with open_link(config, on_ack=events.on_ack, epoch=0x5EED) as restarted:
            restarted.resend(2, "P-2", Verdict.REJECT, Reason.ANOMALY)
            restarted.resend(3, "P-3", Verdict.REJECT, Reason.ANOMALY)
            restarted.resend(3, "P-3", Verdict.REJECT, Reason.ANOMALY)   # already queued: no-op
            assert restarted.send(4, "P-4", Verdict.ACCEPT, Reason.OK, _soon()).acked
            assert events.wait_acks(3)
        assert sorted(events.acks) == [(2, True), (3, True), (4, False)]
        assert [r.seq for r in sim.received()] == [1, 2, 3, 4]
        assert sim.counters().duplicates == 2


def test_plc_restart_on_the_same_endpoint_loses_nothing() -> None:
    probe = PlcSimulator.on_zmq("tcp://127.0.0.1:*")
    endpoint = probe.address
    probe.stop()
    events = Events()
    with open_link(_link_config("zmq", endpoint), on_ack=events.on_ack, on_alarm=events.on_alarm,
                   on_alarm_cleared=events.on_cleared) as link:
        result = link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, _soon(0.2))
        assert not result.acked and link.health().outbox_depth == 1
        assert not link.health().connected
        with PlcSimulator.on_zmq(endpoint) as sim:
            assert events.wait_acks(1)
            assert events.acks == [(1, True)]
            assert [r.seq for r in sim.received()] == [1]
        assert any("PLC silent" in text for text in events.alarms)


def test_missing_serial_device_raises_an_alarm_instead_of_failing_start() -> None:
    events = Events()
    with open_link(_link_config("serial", "/dev/nonexistent-musc-tty"), on_alarm=events.on_alarm) as link:
        result = link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, _soon(0.1))
        health = link.health()
    assert not result.acked
    assert not health.connected and any("nonexistent-musc-tty" in a for a in health.alarms)
    assert any("link down" in text for text in events.alarms)


def test_ledger_seqs_beyond_32_bits_travel_modulo_2_to_the_32() -> None:
    with linked("zmq") as (link, sim, events):
        assert link.send(2**32 + 5, "P-big", Verdict.REJECT, Reason.OK, _soon()).acked
    assert events.acks == [(2**32 + 5, False)] and sim.received()[0].seq == 5


def test_send_rejects_bad_input_and_use_after_close() -> None:
    with linked("zmq", silent_after=0, silent_for_s=10.0) as (link, _, _events):
        with pytest.raises(ValueError, match="seq"):
            link.send(-1, "P", Verdict.REJECT, Reason.OK, _soon())
        with pytest.raises(ValueError, match="part_id"):
            link.send(1, "x" * 65, Verdict.REJECT, Reason.OK, _soon())
        assert not link.send(1, "P-1", Verdict.REJECT, Reason.OK, _soon(0.05)).acked
        with pytest.raises(ValueError, match="seq 1 is already waiting"):
            link.send(1, "P-1", Verdict.REJECT, Reason.OK, _soon(0.05))
    with pytest.raises(LinkClosedError):
        link.send(2, "P-2", Verdict.REJECT, Reason.OK, _soon())


def test_close_wakes_waiting_senders_and_stops_heartbeats() -> None:
    with linked("zmq", silent_after=0, silent_for_s=10.0) as (link, sim, _):
        outcome: list[Any] = []
        sender = threading.Thread(target=lambda: outcome.append(
            link.send(1, "P-1", Verdict.REJECT, Reason.OK, _soon(30.0))))
        sender.start()
        assert sim.wait_for(lambda c: c.ignored_while_silent >= 1, 5.0)
        link.close()
        sender.join(5.0)
        assert not sender.is_alive() and not outcome[0].acked and "link closed" in outcome[0].error
        seen = sim.counters().ignored_while_silent
        time.sleep(0.3)                                         # three heartbeat periods
        assert sim.counters().ignored_while_silent == seen
