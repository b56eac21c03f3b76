"""The running line end to end, over real links (ZeroMQ on 127.0.0.1, serial over a pty pair), with the
fault runs the line must survive. A tiny random feature model keeps these fast; what is asserted is the
bookkeeping (every part decided, recorded, signalled and acknowledged exactly once), not accuracy."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from musc_edge.edge.config import parse_config
from musc_edge.edge.ledger import Ledger
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import Reason, Verdict
from musc_edge.edge.runtime.inspector import Inspector
from musc_edge.edge.runtime.line import Line
from musc_edge.edge.runtime.pool_store import PoolMismatchError
from musc_edge.edge.runtime.status import format_status, line_status
from musc_edge.edge.synthetic import generate_set

ROOT = Path(__file__).resolve().parents[1]


def make_parts(folder: Path, n: int, seed: int = 0) -> Path:
    return generate_set(folder, n=n, defect_fraction=0.2, seed=seed, size=128) / "test"


def raw_config(model: Path, parts: Path, storage: Path, link: dict, **line) -> dict:
    return {
        "line": {"deadline_ms": 3000, "queue_size": 4, **line},
        "model": {"path": str(model), "size": 112, "blocks": [6, 9]},
        "recipes": {"default": {"threshold": 1.0, "pool": {"capacity": 10, "min_size": 4,
                                                           "persist_every_s": 0.2}}},
        "source": {"type": "replay", "path": str(parts), "pattern": "*/*.png", "rate": 8.0,
                   "shuffle": True, "seed": 1, "part_prefix": "part"},
        "link": {"heartbeat_interval_s": 0.2, "silence_alarm_s": 0.6, **link},
        "storage": {"dir": str(storage), "archive": {"quota_mb": 5}},
    }


def run_line(raw: dict) -> tuple[Line, list]:
    line = Line(parse_config(raw))
    line.run()
    return line, line.ledger_rows()


def assert_each_part_once(rows, n_parts: int, plc: PlcSimulator) -> None:
    assert len(rows) == n_parts
    assert len({r.part_id for r in rows}) == n_parts
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert all(r.acked for r in rows), [r.seq for r in rows if not r.acked]
    received = plc.received()
    assert sorted(v.seq for v in received) == [r.seq for r in rows]  # each verdict logged once by the PLC
    by_seq = {r.seq: r for r in rows}
    assert all(by_seq[v.seq].signalled.value == v.verdict for v in received)


def test_every_part_is_decided_recorded_and_acked_once_over_zeromq(toy_model, tmp_path):
    parts = make_parts(tmp_path / "parts", 16)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        line, rows = run_line(raw_config(toy_model, parts, tmp_path / "line",
                                         {"type": "zmq", "endpoint": plc.address}))
        assert_each_part_once(rows, 16, plc)
        assert plc.counters().heartbeats > 0
    warmup = [r for r in rows if r.reason == Reason.WARMUP]
    # Warm-up lasts until min_size=4 members; a warm-up part dropped as an outlier extends it.
    assert 4 <= len(warmup) <= 6 and warmup == rows[:len(warmup)]
    assert all(r.signalled == Verdict.REJECT for r in warmup)  # fail-safe during warm-up
    scored = rows[len(warmup):]
    assert {r.verdict for r in scored} <= {Verdict.ACCEPT, Verdict.REJECT}, [r.detail for r in scored]
    assert all(r.score is not None and r.features_s > 0 for r in scored)
    assert (tmp_path / "line" / "pools" / "default.npz").is_file()
    status = line_status(tmp_path / "line")
    assert status["counters"]["parts"] == 16 and status["counters"]["unacked"] == 0
    assert status["counters"]["no_verdict_by_reason"] == {"warmup": len(warmup)}
    assert status["pools"]["default"]["size"] >= 4
    assert f"NO_VERDICT {len(warmup)} (warmup {len(warmup)})" in format_status(status)


def test_serial_link_over_a_pty_pair(toy_model, tmp_path):
    parts = make_parts(tmp_path / "parts", 10)
    with PlcSimulator.on_pty() as plc:
        _, rows = run_line(raw_config(toy_model, parts, tmp_path / "line", {"type": "serial", "url": plc.address}))
        assert_each_part_once(rows, 10, plc)


def test_plc_silent_for_a_while_then_back_nothing_lost_or_duplicated(toy_model, tmp_path):
    parts = make_parts(tmp_path / "parts", 24)
    raw = None
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*", silent_after=6, silent_for_s=1.2) as plc:
        raw = raw_config(toy_model, parts, tmp_path / "line", {"type": "zmq", "endpoint": plc.address},
                         deadline_ms=400)
        line, rows = run_line(raw)
        assert_each_part_once(rows, 24, plc)
        assert plc.counters().ignored_while_silent > 0
    late = [r for r in rows if r.ack_late]
    assert late, "verdicts sent during the gap must be delivered late, not lost"
    assert any("silent" in alarm for alarm in line.stats.alarms), line.stats.alarms


def write_bad_frames(folder: Path) -> None:
    good = sorted(folder.glob("good/*.png"))
    data = good[0].read_bytes()
    (folder / "good" / "zz_truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "good" / "zz_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    (folder / "good" / "zz_empty.png").write_bytes(b"")


def test_corrupt_and_truncated_frames_fail_safe_and_the_run_continues(toy_model, tmp_path):
    parts = make_parts(tmp_path / "parts", 12)
    write_bad_frames(parts)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        _, rows = run_line(raw_config(toy_model, parts, tmp_path / "line", {"type": "zmq", "endpoint": plc.address}))
        assert_each_part_once(rows, 15, plc)
    bad = [r for r in rows if Path(r.source_ref).name.startswith("zz_")]
    assert len(bad) == 3
    assert all(r.verdict == Verdict.NO_VERDICT and r.reason == Reason.DECODE_ERROR for r in bad)
    assert all(r.signalled == Verdict.REJECT for r in bad)
    assert all(Path(r.source_ref).name in r.detail or r.part_id in r.detail for r in bad)
    warmup = sum(r.reason == Reason.WARMUP for r in rows)
    assert sum(r.reason in (Reason.OK, Reason.ANOMALY) for r in rows) == 15 - 3 - warmup


def test_parts_faster_than_the_engine_are_counted_as_overload_never_dropped(toy_model, tmp_path):
    parts = make_parts(tmp_path / "parts", 40)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        raw = raw_config(toy_model, parts, tmp_path / "line", {"type": "zmq", "endpoint": plc.address},
                         queue_size=1)
        raw["source"]["rate"] = 2000.0
        line, rows = run_line(raw)
        assert_each_part_once(rows, 40, plc)
    overload = [r for r in rows if r.reason == Reason.OVERLOAD]
    assert overload and all(r.signalled == Verdict.REJECT for r in overload)
    assert line.stats.by_reason.get("overload") == len(overload)


def test_pass_flagged_fail_safe_accepts_but_flags(toy_model, tmp_path):
    parts = make_parts(tmp_path / "parts", 6)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        _, rows = run_line(raw_config(toy_model, parts, tmp_path / "line",
                                      {"type": "zmq", "endpoint": plc.address}, fail_safe="pass_flagged"))
    warmup = [r for r in rows if r.reason == Reason.WARMUP]
    assert warmup and all(r.verdict == Verdict.NO_VERDICT and r.signalled == Verdict.ACCEPT for r in warmup)


def test_sigkill_then_restart_restores_pool_and_ledger_and_resends(toy_model, tmp_path):
    first = make_parts(tmp_path / "first", 60, seed=1)
    second = make_parts(tmp_path / "second", 8, seed=2)
    storage = tmp_path / "line"
    with PlcSimulator.on_pty() as plc:
        raw = raw_config(toy_model, first, storage, {"type": "serial", "url": plc.address})
        raw["source"]["rate"] = 10.0
        config_path = tmp_path / "line.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "musc_edge.edge.cli", "run", "--config", str(config_path)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert plc.wait_for(lambda c: c.received >= 15, timeout_s=60), proc.stderr.read1(4096) if proc.poll() else ""
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        signalled_before = {v.seq for v in plc.received()}
        reader = Ledger.open_readonly(storage / "ledger.sqlite")
        rows_before = {r.seq: r for r in reader.iter_rows()}
        reader.close()
        assert signalled_before <= set(rows_before), "a signalled part has no ledger row"
        assert len(rows_before) < 60, "the kill came too late to test anything"
        assert (storage / "pools" / "default.npz").is_file()

        raw["source"] = {**raw["source"], "path": str(second), "part_prefix": "R"}
        config_path.write_text(yaml.safe_dump(raw))
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        reader = Ledger.open_readonly(storage / "ledger.sqlite")
        rows = list(reader.iter_rows())
        reader.close()
        assert len(rows) == len(rows_before) + 8
        assert all(r.acked for r in rows), "rows never acked before the kill must be re-sent after restart"
        assert sorted(v.seq for v in plc.received()) == [r.seq for r in rows]
        restarted = [r for r in rows if r.part_id.startswith("R")]
        assert not any(r.reason == Reason.WARMUP for r in restarted), "the restored pool should score at once"


def test_a_pool_from_another_model_is_refused(toy_model, tmp_path):
    from tests.toymodel import build_toy_model

    parts = make_parts(tmp_path / "parts", 6)
    raw = raw_config(toy_model, parts, tmp_path / "line", {"type": "zmq", "endpoint": "tcp://127.0.0.1:1"})
    inspector = Inspector(parse_config(raw))
    inspector.save_pools()
    other = build_toy_model(tmp_path / "other.onnx", seed=9)
    raw["model"]["path"] = str(other)
    with pytest.raises(PoolMismatchError, match="tokens"):
        Inspector(parse_config(raw)).restore_pools()


def test_systemd_gets_ready_watchdog_and_stopping(toy_model, tmp_path, monkeypatch):
    import socket

    address = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    parts = make_parts(tmp_path / "parts", 6)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        run_line(raw_config(toy_model, parts, tmp_path / "line", {"type": "zmq", "endpoint": plc.address}))
    messages = []
    while True:
        try:
            messages.append(receiver.recv(4096).decode())
        except socket.timeout:
            break
    receiver.close()
    assert any(m.startswith("READY=1") for m in messages)
    assert "WATCHDOG=1" in messages
    assert messages[-1] == "STOPPING=1"


def test_parts_extracted_side_by_side_are_decided_in_arrival_order_and_a_faulty_extraction_is_one_no_verdict(
        toy_model, tmp_path, monkeypatch):
    """Three extract workers, extraction times shuffled so later parts often finish first, and one extraction
    that raises: every part still gets one row in the order the source delivered it, and only that part fails."""
    parts = make_parts(tmp_path / "parts", 20)
    original, calls = Inspector.extract, []

    def uneven(self, part):
        calls.append(part.part_id)
        time.sleep(0.03 * (len(calls) % 3 == 1))   # every third part takes longer than the two after it
        if len(calls) == 12:
            raise RuntimeError("engine fault on this part")
        return original(self, part)

    monkeypatch.setattr(Inspector, "extract", uneven)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        raw = raw_config(toy_model, parts, tmp_path / "line", {"type": "zmq", "endpoint": plc.address},
                         extract_workers=3)
        raw["source"]["rate"] = 40.0
        _, rows = run_line(raw)
        assert_each_part_once(rows, 20, plc)
    assert [r.capture_time for r in rows] == sorted(r.capture_time for r in rows)
    failed = [r for r in rows if r.reason == Reason.ENGINE_ERROR]
    assert [r.part_id for r in failed] == [calls[11]] and "engine fault on this part" in failed[0].detail
    assert all(r.verdict in (Verdict.ACCEPT, Verdict.REJECT) for r in rows
               if r.reason not in (Reason.WARMUP, Reason.ENGINE_ERROR, Reason.OVERLOAD, Reason.DEADLINE))
