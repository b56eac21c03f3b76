"""The line epoch (issue 25, item 1): two installs' sequence numbers can never be confused at the PLC.

Every message carries the epoch of the runtime's ledger; the PLC (and plc-sim) de-duplicates on (epoch, seq), and
the runtime sends no verdict before the PLC acknowledged the epoch. Real transports on loopback: a pty for serial,
ZeroMQ and Modbus/TCP on 127.0.0.1.
"""
from __future__ import annotations

import os
import socket
import time
import tty
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from musc_edge.edge.ledger import Ledger
from musc_edge.edge.links import open_link
from musc_edge.edge.links.framing import (
    MessageType,
    StreamDeframer,
    ack_frame,
    decode_body,
    encode_body,
    stream_frame,
)
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import Reason, Verdict
from tests.test_runtime import raw_config, run_line

FAST = dict(ack_timeout_s=0.1, heartbeat_interval_s=0.1, silence_alarm_s=0.5, backoff_initial_s=0.05,
            backoff_max_s=0.2)
LINKS = ("serial", "zmq", "modbus-tcp")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def plc_for(kind: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A simulated PLC of ``kind`` and the link config that reaches it."""
    with ExitStack() as stack:
        if kind == "serial":
            sim = stack.enter_context(PlcSimulator.on_pty())
            yield sim, {"type": "serial", "url": sim.address, **FAST}
        elif kind == "zmq":
            sim = stack.enter_context(PlcSimulator.on_zmq("tcp://127.0.0.1:*"))
            yield sim, {"type": "zmq", "endpoint": sim.address, **FAST}
        else:
            pytest.importorskip("pymodbus")
            from musc_edge.edge.plc_sim.modbus import ModbusPlcSimulator

            port = _free_port()
            sim = stack.enter_context(ModbusPlcSimulator.on_tcp("127.0.0.1", port))
            yield sim, {"type": "modbus-tcp", "port": port, **FAST, "ack_timeout_s": 0.25}


def _deliver(config: dict[str, Any], epoch: int, verdicts: list[tuple[int, Verdict]]) -> None:
    with open_link(config, epoch=epoch) as link:
        for seq, verdict in verdicts:
            reason = Reason.ANOMALY if verdict is Verdict.REJECT else Reason.OK
            assert link.send(seq, f"E{epoch:X}-{seq}", verdict, reason, time.monotonic() + 5.0).acked


@pytest.mark.parametrize("kind", LINKS)
def test_a_fresh_install_against_a_plc_that_saw_another_epoch_delivers_every_reject(kind: str,
                                                                                  tmp_path: Path) -> None:
    with Ledger(tmp_path / "old.sqlite") as old, Ledger(tmp_path / "new.sqlite") as new:
        old_epoch, new_epoch = old.line_epoch, new.line_epoch
    assert old_epoch != new_epoch                     # chance of a clash: 1 in 4e9
    first = [(seq, Verdict.ACCEPT) for seq in range(1, 9)]
    again = [(seq, Verdict.REJECT if seq % 2 else Verdict.ACCEPT) for seq in range(1, 9)]   # the same seqs
    with plc_for(kind) as (sim, config):
        _deliver(config, old_epoch, first)
        _deliver(config, new_epoch, again)
        got = {(v.epoch, v.seq): v.verdict for v in sim.received()}
        counters = sim.counters()
    assert {seq for (epoch, seq) in got if epoch == new_epoch} == set(range(1, 9))
    assert all(got[(new_epoch, seq)] == verdict.value for seq, verdict in again)     # every REJECT reached it
    assert counters.duplicates == 0 and counters.out_of_order == 0 and counters.epochs == 2


@pytest.mark.parametrize("kind", LINKS)
def test_the_same_epoch_after_a_restart_is_still_deduplicated(kind: str) -> None:
    with plc_for(kind) as (sim, config):
        _deliver(config, 0x5EED, [(1, Verdict.REJECT), (2, Verdict.ACCEPT)])
        with open_link(config, epoch=0x5EED) as restarted:              # same ledger: same epoch
            restarted.resend(2, "E5EED-2", Verdict.ACCEPT, Reason.OK)
            assert restarted.send(3, "E5EED-3", Verdict.REJECT, Reason.ANOMALY, time.monotonic() + 5.0).acked
        assert [v.seq for v in sim.received()] == [1, 2, 3]
        assert sim.counters().duplicates == 1 and sim.counters().epochs == 1


def test_the_ledger_keeps_its_epoch_and_a_new_ledger_gets_another(tmp_path: Path) -> None:
    with Ledger(tmp_path / "a.sqlite") as ledger:
        epoch = ledger.line_epoch
    assert 1 <= epoch <= 0xFFFFFFFF
    with Ledger(tmp_path / "a.sqlite") as reopened:
        assert reopened.line_epoch == epoch
    with Ledger.open_readonly(tmp_path / "a.sqlite") as reader:
        assert reader.line_epoch == epoch
    epochs = set()
    for i in range(5):
        with Ledger(tmp_path / f"fresh{i}.sqlite") as fresh:
            epochs.add(fresh.line_epoch)
    assert len(epochs | {epoch}) == 6


def test_no_verdict_goes_out_before_the_plc_acknowledged_the_epoch() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    deframer = StreamDeframer()

    def frames(seconds: float) -> list[Any]:
        out, until = [], time.monotonic() + seconds
        while time.monotonic() < until:
            try:
                data = os.read(master, 4096)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            out += [decode_body(body) for body in deframer.feed(data) if isinstance(body, bytes)]
        return out

    os.set_blocking(master, False)
    try:
        with open_link({"type": "serial", "url": os.ttyname(slave), **FAST}, epoch=0xC0FFEE) as link:
            result = link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, time.monotonic() + 0.3)
            early = frames(0.3)
            assert not result.acked
            assert early and {f.type for f in early} == {MessageType.EPOCH}     # only announcements, repeated
            assert all(f.epoch == 0xC0FFEE and f.seq == 0 for f in early)
            os.write(master, stream_frame(encode_body(ack_frame(0, MessageType.EPOCH, epoch=0xC0FFEE))))
            later = frames(0.5)
            verdicts = [f for f in later if f.type is MessageType.VERDICT]
            assert verdicts and all(f.epoch == 0xC0FFEE and f.seq == 1 for f in verdicts)
            assert link.health().epoch_acked
    finally:
        os.close(master)
        os.close(slave)


def test_an_ack_of_another_epoch_acknowledges_nothing() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    try:
        with open_link({"type": "serial", "url": os.ttyname(slave), **FAST}, epoch=0xC0FFEE) as link:
            until = time.monotonic() + 1.0
            while time.monotonic() < until:                   # answer every announcement for epoch 1 instead
                try:
                    os.read(master, 4096)
                except BlockingIOError:
                    pass
                os.write(master, stream_frame(encode_body(ack_frame(0, MessageType.EPOCH, epoch=1))))
                time.sleep(0.02)
            assert not link.health().epoch_acked
    finally:
        os.close(master)
        os.close(slave)


def test_a_line_with_a_fresh_storage_delivers_every_reject_to_a_plc_that_saw_another_epoch(toy_model,
                                                                                           tmp_path: Path) -> None:
    from musc_edge.edge.synthetic import generate_set

    parts = generate_set(tmp_path / "parts", n=12, defect_fraction=0.3, seed=3, size=128) / "test"
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        link = {"type": "zmq", "endpoint": plc.address}
        _, old_rows = run_line(raw_config(toy_model, parts, tmp_path / "install-1", link))
        _, new_rows = run_line(raw_config(toy_model, parts, tmp_path / "install-2", link))   # a replaced SD card
        received = {(v.epoch, v.seq): v for v in plc.received()}
        counters = plc.counters()
    with Ledger.open_readonly(tmp_path / "install-2" / "ledger.sqlite") as ledger:
        new_epoch = ledger.line_epoch
    assert [r.seq for r in new_rows] == [r.seq for r in old_rows]          # both count from 1
    rejects = [r for r in new_rows if r.signalled is Verdict.REJECT]
    assert rejects and all(received[(new_epoch, r.seq)].verdict == "REJECT" for r in rejects)
    assert all(r.acked for r in new_rows)
    assert counters.duplicates == 0 and counters.epochs == 2
    from musc_edge.edge.runtime.status import format_status, line_status

    status = line_status(tmp_path / "install-2")
    status["live"] = {"calibration_version": 1, "queue_depth": 0, "alarms": [],
                      "link": {"connected": True, "outbox_depth": 0, "epoch": new_epoch}}
    assert f"epoch {new_epoch:08X}" in format_status(status)               # what a technician compares
