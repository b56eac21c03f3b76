"""Modbus reject links over real pymodbus on loopback (TCP on 127.0.0.1, RTU over a pty pair), with the
fault tests the framed links pass (tests/test_links.py): PLC silent, refusing, restarts, corrupt answers."""
from __future__ import annotations

import re
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import pytest

pytest.importorskip("pymodbus")

from musc_edge.edge.links import PlantLink, open_link, parse_link_config  # noqa: E402
from musc_edge.edge.links.framing import NakCode  # noqa: E402
from musc_edge.edge.links.register_map import MAP_VERSION, REGISTER_COUNT, Reg, join32, part_hash, part_text  # noqa: E402,E501
from musc_edge.edge.plc_sim.modbus import ModbusPlcSimulator, PtyPair  # noqa: E402
from musc_edge.edge.record import Reason, Verdict  # noqa: E402

FAST = dict(ack_timeout_s=0.1, heartbeat_interval_s=0.1, silence_alarm_s=0.5,
            backoff_initial_s=0.05, backoff_max_s=0.2)
KINDS = ("modbus-tcp", "modbus-rtu")


class Events:
    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []
        self.alarms: list[str] = []
        self.cleared: list[str] = []
        self._changed = threading.Condition()

    def on_ack(self, seq: int, late: bool) -> None:
        with self._changed:
            self.acks.append((seq, late))
            self._changed.notify_all()

    def wait_acks(self, count: int, timeout_s: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.acks) >= count, timeout_s)

    def callbacks(self) -> dict[str, Any]:
        return dict(on_ack=self.on_ack, on_alarm=self.alarms.append, on_alarm_cleared=self.cleared.append)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Bench:
    """Where a Modbus link and its simulated PLC meet: a TCP port or the two ends of a pty pair."""

    def __init__(self, kind: str, stack: ExitStack) -> None:
        self.kind = kind
        if kind == "modbus-tcp":
            self.port = free_port()
        else:
            self.pair = stack.enter_context(PtyPair())

    def link_config(self, **settings: Any) -> dict[str, Any]:
        where = {"port": self.port} if self.kind == "modbus-tcp" else {"port": self.pair.a, "parity": "N"}
        return {"type": self.kind, **where, **FAST, **settings}

    def sim(self, **options: Any) -> ModbusPlcSimulator:
        if self.kind == "modbus-tcp":
            return ModbusPlcSimulator.on_tcp("127.0.0.1", self.port, **options)
        return ModbusPlcSimulator.on_rtu(self.pair.b, parity="N", **options)


@contextmanager
def linked(kind: str, settings: dict[str, Any] | None = None,
           **sim_options: Any) -> Iterator[tuple[PlantLink, ModbusPlcSimulator, Events]]:
    events = Events()
    with ExitStack() as stack:
        bench = Bench(kind, stack)
        link = stack.enter_context(open_link(bench.link_config(**(settings or {})), **events.callbacks()))
        sim = stack.enter_context(bench.sim(**sim_options))
        yield link, sim, events


def _soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


@pytest.mark.parametrize("kind", KINDS)
def test_a_verdict_lands_in_the_documented_registers_and_is_acked_once(kind: str) -> None:
    with linked(kind) as (link, sim, events):
        link.set_calibration_version("7")
        result = link.send(70_000, "P-17", Verdict.REJECT, Reason.ANOMALY, _soon())
        assert result.acked and result.error is None
        assert events.acks == [(70_000, False)]
        [got] = sim.received()
        assert (got.seq, got.part_id, got.verdict, got.reason, got.late) == (70_000, "P-17", "REJECT", 1, False)
        registers = link._transport.image.snapshot()          # what the PLC reads with one FC3
        assert join32(registers[Reg.SEQ_HI], registers[Reg.SEQ_LO]) == 70_000
        assert join32(registers[Reg.PART_HASH_HI], registers[Reg.PART_HASH_LO]) == part_hash("P-17")
        assert part_text(registers[Reg.PART_TEXT:Reg.PART_TEXT + 32]) == "P-17"
        assert (registers[Reg.VERDICT], registers[Reg.REASON], registers[Reg.CALIBRATION]) == (2, 1, 7)
        assert registers[Reg.NEW_VERDICT] == 0                  # cleared by the PLC's ACK_SEQ
        health = link.health()
        assert health.connected and health.outbox_depth == 0 and health.acked == 1 and not health.alarms


def test_the_plc_cannot_write_the_runtimes_registers_and_reads_the_whole_map_at_once() -> None:
    from pymodbus.client import ModbusTcpClient

    with ExitStack() as stack:
        bench = Bench("modbus-tcp", stack)
        stack.enter_context(open_link(bench.link_config()))
        client = ModbusTcpClient("127.0.0.1", port=bench.port, timeout=1.0)
        assert client.connect()
        stack.callback(client.close)
        refused = client.write_registers(Reg.SEQ_HI, [0, 5], device_id=1)
        assert refused.isError() and refused.exception_code == 2       # ILLEGAL DATA ADDRESS
        beyond = client.read_holding_registers(REGISTER_COUNT - 1, count=2, device_id=1)
        assert beyond.isError()
        block = client.read_holding_registers(0, count=REGISTER_COUNT, device_id=1)
        assert not block.isError() and block.registers[Reg.MAP_VERSION] == MAP_VERSION == 2


@pytest.mark.parametrize("kind", KINDS)
def test_nak_is_retried_until_acked(kind: str) -> None:
    with linked(kind) as (link, sim, events):
        sim.refuse_next(2, NakCode.BUSY)
        result = link.send(1, "P-1", Verdict.ACCEPT, Reason.OK, _soon())
        assert result.acked and result.attempts == 3
        assert link.health().naks == 2 and sim.counters().naks_sent == 2
        assert [r.seq for r in sim.received()] == [1]


def test_a_plc_that_keeps_refusing_raises_an_alarm_until_it_takes_the_verdict() -> None:
    with linked("modbus-tcp", dict(max_attempts=3)) as (link, sim, events):
        sim.refuse_next(1000, NakCode.BAD_FORMAT)
        result = link.send(7, "P-7", Verdict.REJECT, Reason.ANOMALY, _soon(0.4))
        assert not result.acked and "NAK BAD_FORMAT" in (result.error or "")
        assert any("PLC refuses seq 7" in text for text in link.health().alarms)
        sim.refuse_next(0)
        assert events.wait_acks(1)
        assert events.acks == [(7, True)] and link.health().alarms == ()


@pytest.mark.parametrize("kind", KINDS)
def test_plc_silence_delivers_everything_once_in_order_and_reports_late_acks(kind: str) -> None:
    with linked(kind, silent_after=3, silent_for_s=1.0) as (link, sim, events):
        results = {seq: link.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, _soon(2.0 if seq <= 3 else 0.15))
                   for seq in range(1, 9)}                  # the PLC goes silent after taking seq 3
        assert events.wait_acks(8, 8.0)
        assert [r.seq for r in sim.received()] == list(range(1, 9))
        assert sim.counters().out_of_order == 0
        assert sorted(events.acks) == [(seq, not results[seq].acked) for seq in range(1, 9)]
        assert all(results[seq].acked for seq in (1, 2, 3)) and not results[4].acked
        assert any(r.late for r in sim.received())
        assert any("PLC silent" in text for text in events.alarms)
        assert any("answering again" in text for text in events.cleared)
        assert link.health().outbox_depth == 0


def test_damaged_acks_are_retried_without_loss_or_double_logging() -> None:
    with linked("modbus-tcp", dict(max_attempts=10), corrupt_rate=0.3, seed=3) as (link, sim, events):
        for seq in range(1, 16):
            link.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, _soon(1.0))
        assert events.wait_acks(15)
        assert [r.seq for r in sim.received()] == list(range(1, 16))
        counters = sim.counters()
        # A damaged ACK_SEQ leaves NEW_VERDICT up: the PLC's next scan sees the seq again and re-acks it.
        assert counters.corrupted_replies > 0 and counters.duplicates > 0 and counters.out_of_order == 0
        assert sorted(seq for seq, _ in events.acks) == list(range(1, 16))


@pytest.mark.parametrize("kind", KINDS)
def test_heartbeats_are_echoed_and_a_silent_plc_raises_the_alarm(kind: str) -> None:
    with linked(kind) as (link, sim, events):
        assert sim.wait_for(lambda c: c.heartbeats >= 5, 5.0)
        assert link.health().heartbeats_acked >= 4 and sim.counters().heartbeat_gaps == 0
        sim.silence(1.0)
        time.sleep(0.8)
        assert any("PLC silent" in text for text in link.health().alarms)
        assert sim.wait_for(lambda c: c.heartbeats >= 10, 5.0)
        deadline = _soon(3.0)
        while link.health().alarms and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.health().alarms == ()
        assert any("answering again" in text for text in events.cleared)


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_restart_resends_unacked_rows_which_the_plc_deduplicates(kind: str) -> None:
    with ExitStack() as stack:
        bench = Bench(kind, stack)
        sim = stack.enter_context(bench.sim())
        with open_link(bench.link_config(), epoch=0x5EED) as first:          # the ledger's epoch survives
            for seq in (1, 2, 3):
                assert first.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, _soon()).acked
        events = Events()
        with open_link(bench.link_config(), epoch=0x5EED, **events.callbacks()) as restarted:   # same port
            restarted.resend(2, "P-2", Verdict.REJECT, Reason.ANOMALY)
            restarted.resend(3, "P-3", Verdict.REJECT, Reason.ANOMALY)
            assert restarted.send(4, "P-4", Verdict.ACCEPT, Reason.OK, _soon(5.0)).acked
            assert events.wait_acks(3)
        assert sorted(events.acks) == [(2, True), (3, True), (4, False)]
        assert [r.seq for r in sim.received()] == [1, 2, 3, 4]
        assert [r.resend for r in sim.received()] == [False, False, False, False]
        assert sim.counters().duplicates == 2


def test_plc_absent_at_start_gets_everything_once_it_connects() -> None:
    with ExitStack() as stack:
        bench = Bench("modbus-tcp", stack)
        events = Events()
        link = stack.enter_context(open_link(bench.link_config(), **events.callbacks()))
        result = link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, _soon(0.2))
        assert not result.acked
        assert not link.health().connected
        time.sleep(FAST["silence_alarm_s"] + 0.1)
        assert any("PLC silent" in text for text in link.health().alarms)
        with bench.sim() as sim:
            assert events.wait_acks(1)
            assert events.acks == [(1, True)] and [r.seq for r in sim.received()] == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_stop_line_is_raised_with_its_reason_and_seen_by_the_plc(kind: str) -> None:
    with linked(kind) as (link, sim, events):
        assert link.send(1, "P-1", Verdict.NO_VERDICT, Reason.DEADLINE, _soon()).acked
        link.send_stop_line("part P-1 got no verdict")
        deadline = _soon(10.0)
        acked = lambda regs: regs[Reg.STOP_ACK] == regs[Reg.STOP_COUNT]   # noqa: E731  the PLC's write-back
        while not (sim.stop_requests >= 1 and acked(link._transport.image.snapshot())) \
                and time.monotonic() < deadline:   # the PLC sees the request, then writes STOP_ACK (RTU: a frame later)
            time.sleep(0.01)
        registers = link._transport.image.snapshot()
        assert sim.stop_requests == 1
        assert registers[Reg.STOP_LINE] == 1 and registers[Reg.LINE_STATE] == 2
        assert part_text(registers[Reg.STOP_TEXT:Reg.STOP_TEXT + 32]) == "part P-1 got no verdict"
        assert registers[Reg.STOP_ACK] == registers[Reg.STOP_COUNT] == 1


def test_a_port_in_use_is_an_alarm_not_a_crash() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        events = Events()
        with open_link({"type": "modbus-tcp", "port": port, **FAST}, **events.callbacks()) as link:
            assert not link.send(1, "P-1", Verdict.REJECT, Reason.OK, _soon(0.1)).acked
            assert any("link down" in text and str(port) in text for text in link.health().alarms)


@pytest.mark.parametrize("raw,named", [
    ({"type": "modbus-tcp", "port": 0}, "link.port"),
    ({"type": "modbus-rtu"}, "link.port"),
    ({"type": "modbus-rtu", "port": "/dev/ttyUSB0", "unit_id": 248}, "link.unit_id"),
    ({"type": "modbus-rtu", "port": "/dev/ttyUSB0", "parity": "X"}, "link.parity"),
    ({"type": "modbus-tcp", "adress": "x"}, "link.adress"),
])
def test_bad_modbus_config_names_the_key(raw: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_link_config(raw)


def test_plc_sim_command_plays_the_modbus_plc(capsys) -> None:
    from musc_edge.edge.plc_sim import main as plc_sim_main

    port = free_port()
    with open_link({"type": "modbus-tcp", "port": port, **FAST}) as link:
        command = threading.Thread(target=plc_sim_main, args=(
            ["--link", "modbus-tcp", "--port", str(port), "--duration", "1.5", "--report-every", "0"],))
        command.start()
        result = link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, _soon(1.4))
        command.join(10)
    assert result.acked
    assert "received=1 " in capsys.readouterr().out


def test_documented_register_example_matches_the_map() -> None:
    from pathlib import Path

    from musc_edge.edge.links.framing import VerdictCode
    from musc_edge.edge.links.register_map import PublishedVerdict, RegisterImage

    doc = Path(__file__).resolve().parents[1] / "docs" / "wire-protocol.md"
    line = re.search(r"^Modbus registers 0-14:((?: \w+)+)$", doc.read_text(encoding="utf-8"), re.M)
    assert line, "worked Modbus example not found in docs/wire-protocol.md"
    image = RegisterImage()
    image.publish(PublishedVerdict(1234, VerdictCode.REJECT, int(Reason.ANOMALY), 0, "P-0042", 3))
    registers = image.snapshot()
    for address, shown in enumerate(line.group(1).split()):
        if shown not in ("H", "P"):
            assert registers[address] == int(shown), (address, shown)
    assert registers[Reg.PART_TEXT:Reg.PART_TEXT + 4] == [0x502D, 0x3030, 0x3432, 0]


def test_a_plc_waiting_for_the_runtime_and_a_shutdown_log_a_few_lines_in_our_words() -> None:
    """Issue 25, row 13: before, pymodbus printed "Connection refused ... Repeating...." 293 times in 3 s and
    20 lines of raw hex when the line stopped. What reaches the root logger (what a console shows) is checked."""
    import logging

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    root, collect, port = logging.getLogger(), Collect(), free_port()
    level = root.level
    root.addHandler(collect)
    root.setLevel(logging.INFO)
    try:
        with ModbusPlcSimulator.on_tcp("127.0.0.1", port, scan_s=0.005) as sim:   # started first, as documented
            time.sleep(1.0)
            assert sim.link_errors > 20                                         # it kept trying, every scan
            with open_link({"type": "modbus-tcp", "port": port, **FAST}) as link:
                assert link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, _soon(5.0)).acked
            time.sleep(0.5)                                                     # the runtime is gone again
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
    texts = [r.getMessage() for r in collect.records]
    shown = [r for r in collect.records if r.levelno >= logging.WARNING]
    assert 1 <= len(shown) <= 3, texts
    assert all(r.name.startswith("musc_edge") for r in shown), texts
    assert any(f"127.0.0.1:{port} not reachable" in r.getMessage() for r in shown), texts
    assert not any(">>>>>" in text or "Repeating" in text for text in texts), texts
