"""The PLC simulator, driven with hand-made frames over a real pty and ZeroMQ, and its command line."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import serial
import zmq

from musc_edge.edge.links import open_link
from musc_edge.edge.links.framing import (
    Frame,
    MessageType,
    NakCode,
    StreamDeframer,
    VerdictFlags,
    ack_frame,
    crc16,
    decode_body,
    encode_body,
    heartbeat_frame,
    reply_target,
    stream_frame,
    verdict_frame,
)
from musc_edge.edge.plc_sim import PlcSimulator, main
from musc_edge.edge.record import Reason, Verdict
from musc_edge.edge.telemetry.local_broker import free_port


class SerialPeer:
    """The runtime's end of the simulator's pty, speaking raw frames."""

    def __init__(self, path: str) -> None:
        self.port = serial.serial_for_url(path, baudrate=115200, timeout=0.02)
        self._deframer = StreamDeframer()

    def write_body(self, body: bytes) -> None:
        self.port.write(stream_frame(body))

    def reply(self, timeout_s: float = 1.0) -> Frame | None:
        until = time.monotonic() + timeout_s
        while time.monotonic() < until:
            for body in self._deframer.feed(self.port.read(64)):
                assert isinstance(body, bytes)
                return decode_body(body)
        return None

    def exchange(self, frame: Frame, timeout_s: float = 1.0) -> Frame | None:
        self.write_body(encode_body(frame))
        return self.reply(timeout_s)


@pytest.fixture
def pty_sim(tmp_path: Path) -> Iterator[tuple[PlcSimulator, SerialPeer]]:
    with PlcSimulator.on_pty(log_path=tmp_path / "plc.jsonl") as sim:
        peer = SerialPeer(sim.address)
        yield sim, peer
        peer.port.close()


def _verdict(seq: int, flags: int = 0) -> Frame:
    return verdict_frame(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, flags)


def test_verdict_is_acked_with_its_seq_and_logged_once(pty_sim, tmp_path: Path) -> None:
    sim, peer = pty_sim
    for _ in range(3):                                   # the same verdict three times
        assert peer.exchange(_verdict(41)) == ack_frame(41, MessageType.VERDICT)
    assert peer.exchange(_verdict(42, VerdictFlags.LATE)) == ack_frame(42, MessageType.VERDICT)
    counters = sim.counters()
    assert (counters.received, counters.duplicates, counters.acks_sent) == (2, 2, 4)
    sim.stop()
    lines = [json.loads(line) for line in (tmp_path / "plc.jsonl").read_text().splitlines()]
    assert [(r["seq"], r["part_id"], r["verdict"], r["reason_label"], r["late"]) for r in lines] == \
        [(41, "P-41", "REJECT", "anomaly", False), (42, "P-42", "REJECT", "anomaly", True)]


def test_heartbeats_are_acked_and_gaps_counted(pty_sim) -> None:
    sim, peer = pty_sim
    for counter in (1, 2, 3, 7, 8):
        assert peer.exchange(heartbeat_frame(counter, 0)) == ack_frame(counter, MessageType.HEARTBEAT)
    counters = sim.counters()
    assert (counters.heartbeats, counters.heartbeat_gaps, counters.received) == (5, 1, 0)


def test_damaged_frames_get_a_nak_naming_the_problem(pty_sim) -> None:
    sim, peer = pty_sim
    body = bytearray(encode_body(_verdict(9)))
    body[-1] ^= 0x01                                     # CRC no longer matches
    peer.write_body(bytes(body))
    nak = peer.reply()
    assert nak is not None and nak.type is MessageType.NAK and nak.seq == 9
    assert reply_target(nak) == (MessageType.VERDICT, NakCode.BAD_CRC)
    unknown = bytearray(encode_body(Frame(MessageType.ACK, 10, b"\x01")))   # a PLC never gets ACKs
    peer.write_body(bytes(unknown))
    assert reply_target(peer.reply()) == (MessageType.ACK, NakCode.UNKNOWN_TYPE)
    bad_verdict = bytearray(encode_body(_verdict(11)))
    bad_verdict[12] = 0                                  # verdict code 0 is never valid
    peer.write_body(bytes(bad_verdict[:-2]) + crc16(bytes(bad_verdict[:-2])).to_bytes(2, "big"))
    assert reply_target(peer.reply()) == (MessageType.VERDICT, NakCode.BAD_FORMAT)
    counters = sim.counters()
    assert (counters.crc_errors, counters.bad_frames, counters.naks_sent, counters.received) == (1, 2, 3, 0)


def test_unknown_reason_codes_are_taken(pty_sim) -> None:
    sim, peer = pty_sim
    frame = _verdict(5)
    future = Frame(frame.type, frame.seq, frame.payload[:2] + b"\xc8" + frame.payload[3:])
    assert peer.exchange(future) == ack_frame(5, MessageType.VERDICT)
    assert sim.received()[0].reason_label == "unknown_200"


def test_silence_ignores_everything_then_answers_again(pty_sim) -> None:
    sim, peer = pty_sim
    sim.silence(0.3)
    assert peer.exchange(_verdict(1), timeout_s=0.1) is None
    assert peer.exchange(heartbeat_frame(1, 1), timeout_s=0.1) is None
    time.sleep(0.3)
    assert peer.exchange(_verdict(1)) == ack_frame(1, MessageType.VERDICT)
    counters = sim.counters()
    assert (counters.ignored_while_silent, counters.received, counters.heartbeats) == (2, 1, 0)


def test_silent_after_n_verdicts() -> None:
    with PlcSimulator.on_pty(silent_after=2, silent_for_s=0.3) as sim:
        peer = SerialPeer(sim.address)
        assert peer.exchange(_verdict(1)) is not None
        assert peer.exchange(_verdict(2)) is not None      # the Nth is still acked
        assert peer.exchange(_verdict(3), timeout_s=0.1) is None
        time.sleep(0.3)
        assert peer.exchange(_verdict(3)) is not None
        peer.port.close()
    assert [r.seq for r in sim.received()] == [1, 2, 3]


def test_refused_verdicts_are_not_taken(pty_sim) -> None:
    sim, peer = pty_sim
    sim.refuse_next(1, NakCode.BUSY)
    assert reply_target(peer.exchange(_verdict(1))) == (MessageType.VERDICT, NakCode.BUSY)
    assert peer.exchange(_verdict(1)) == ack_frame(1, MessageType.VERDICT)
    assert (sim.counters().received, sim.counters().duplicates) == (1, 0)


def test_out_of_order_and_wrapping_seqs() -> None:
    with PlcSimulator.on_pty() as sim:
        peer = SerialPeer(sim.address)
        for seq in (0xFFFFFFFE, 0xFFFFFFFF, 0, 1, 5, 3):         # wraps at 2**32, then 3 after 5
            assert peer.exchange(_verdict(seq)) is not None
        peer.port.close()
    assert (sim.counters().received, sim.counters().out_of_order) == (6, 1)


def test_corruption_is_reproducible_for_a_seed() -> None:
    def run(seed: int) -> tuple[list[str], int, int]:
        with PlcSimulator.on_pty(corrupt_rate=0.4, seed=seed) as sim:
            peer = SerialPeer(sim.address)
            outcomes = []
            for seq in range(20):
                peer.write_body(encode_body(_verdict(seq)))
                outcomes.append(_outcome(peer))
            peer.port.close()
        return outcomes, sim.counters().crc_errors, sim.counters().corrupted_replies

    first, again, other = run(3), run(3), run(4)
    assert first == again and first != other
    assert first[1] > 0 and first[2] > 0


def _outcome(peer: SerialPeer) -> str:
    try:
        reply = peer.reply()
    except ValueError as exc:                            # a deliberately damaged reply
        return f"damaged:{type(exc).__name__}"
    return "none" if reply is None else reply.type.name


def test_delayed_answers_make_the_link_retry_and_the_plc_deduplicate() -> None:
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*", delay_s=0.08) as sim:
        acks: list[tuple[int, bool]] = []
        config = {"type": "zmq", "endpoint": sim.address, "ack_timeout_s": 0.03,
                  "heartbeat_interval_s": 1.0, "max_attempts": 10}
        with open_link(config, on_ack=lambda seq, late: acks.append((seq, late))) as link:
            assert link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, time.monotonic() + 2.0).acked
            assert link.health().retries >= 1
        assert sim.counters().received == 1 and sim.counters().duplicates >= 1
        assert acks == [(1, False)]


def test_zmq_router_answers_each_peer() -> None:
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as sim:
        context = zmq.Context.instance()
        dealers = [context.socket(zmq.DEALER) for _ in range(2)]
        try:
            for index, dealer in enumerate(dealers):
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(sim.address)
                dealer.send(encode_body(_verdict(100 + index)))
            for index, dealer in enumerate(dealers):
                assert dealer.poll(2000)
                assert decode_body(dealer.recv()) == ack_frame(100 + index, MessageType.VERDICT)
        finally:
            for dealer in dealers:
                dealer.close()
    assert sim.counters().received == 2


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="corrupt_rate"):
        PlcSimulator.on_pty(corrupt_rate=1.5)
    with pytest.raises(ValueError, match="delay_s"):
        PlcSimulator.on_zmq("tcp://127.0.0.1:*", delay_s=-1)
    with pytest.raises(ValueError, match="nosuch://"):
        PlcSimulator.on_serial("nosuch://x")


def test_cli_runs_logs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A port from a plain socket closed at once (a stopped ZeroMQ socket may still hold its port a moment).
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "verdicts.jsonl"
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(main(
        ["--link", "zmq", "--endpoint", endpoint, "--log", str(log), "--report-every", "0.2",
         "--duration", "1.0"])))
    runner.start()
    config = {"type": "zmq", "endpoint": endpoint, "heartbeat_interval_s": 0.1, "silence_alarm_s": 0.5}
    with open_link(config) as link:
        for seq in (1, 2, 3):
            assert link.send(seq, f"P-{seq}", Verdict.ACCEPT, Reason.OK, time.monotonic() + 1.0).acked
    runner.join(5.0)
    assert codes == [0]
    assert [json.loads(line)["seq"] for line in log.read_text().splitlines()] == [1, 2, 3]
    out = capsys.readouterr().out
    assert f"listening on {endpoint}" in out and "final received=3 duplicates=0" in out


def test_cli_refuses_incomplete_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--link", "serial"]) == 2
    assert main(["--link", "zmq", "--endpoint", "tcp://127.0.0.1:*", "--corrupt-rate", "2"]) == 2
    assert "corrupt_rate" in capsys.readouterr().err


def test_help_lists_every_link_and_a_bad_link_names_them_all(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 25, row 12: --help listed {serial,zmq} only and a bad value said "choose from 'serial', 'zmq'"."""
    links = ("serial", "zmq", "modbus-tcp", "modbus-rtu", "opcua")
    for argv in (["--help"], ["--link", "modbus-tcp", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        usage = capsys.readouterr().out
        assert "{" + ",".join(links) + "}" in usage
    with pytest.raises(SystemExit) as done:
        main(["--link", "profinet"])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert all(f"'{link}'" in error for link in links) and "profinet" in error
