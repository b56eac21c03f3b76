"""Issue #8: each hostile input of the table, run again, gives the safe outcome.

Rows 1-3 (fields that fit neither wire nor ledger), 4 (non-finite thresholds), 5 (token), 6-8 (authority
and the verdict snapshot), 9 (pixel budget), 10 (stop_line), 11 (reseed), 12 (disk full, temp files,
storage.dir, duplicate keys). A running line is fed over ZeroMQ and signals a PLC simulator (tests/hostile.py).
"""
from __future__ import annotations

import errno
import json
import math
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from musc_edge.edge.config import ConfigError, load_config, parse_config
from musc_edge.edge.ledger import Ledger
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime.calibration_state import (Calibration, CalibrationError, CalibrationStore, calibration_bytes,
                                                       read_audit_key)
from musc_edge.edge.runtime.control import ControlServer, ensure_token, token_path
from musc_edge.edge.runtime.inspector import Inspector
from musc_edge.edge.runtime.line import Line, LineStopped
from musc_edge.edge.runtime.verdict import verdict_from_pool
from musc_edge.edge.sources.base import DecodeError, decode_part
from musc_edge.edge.sources.fields import safe_part_id
from musc_edge.edge.sources.sender_frames import parse_frame_ref

from .hostile import LiveLine, assert_one_row_and_ack_each, line_config, png, png_declaring, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plc():
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as sim:
        yield sim


@pytest.fixture
def live(toy_model, tmp_path, plc):
    line = LiveLine(line_config(toy_model, tmp_path / "line", plc.address))
    yield line
    if line.thread.is_alive():
        line.stop()


# ----------------------------------------------------------------- rows 1-3: fields that fit nowhere

def test_rows_1_2_bad_part_id_and_encoder_become_no_verdict_under_a_safe_id_and_the_line_runs_on(live, plc):
    long_id, huge = "A" * 65, 2 ** 70
    live.send(png(1), part_id="ok-1")
    live.send(png(2), part_id=long_id)                      # row 1: 65 bytes, the wire takes 64
    live.send(png(3), part_id="ok-2", encoder=huge)         # row 2: beyond SQLite's int64
    live.send(png(4), part_id="\ud800bad")                  # a lone surrogate: not UTF-8 at all
    live.send(png(5), part_id="ok-3", capture_time=1e300)
    for k in range(4):                                      # and the parts after them get rows and messages
        live.send(png(10 + k), part_id=f"after-{k}")
    live.wait_parts(9)
    rows = live.stop()
    assert_one_row_and_ack_each(rows, plc)
    by_id = {r.part_id: r for r in rows}
    bad = by_id[safe_part_id(long_id)]
    assert bad.verdict == Verdict.NO_VERDICT and bad.reason == Reason.DECODE_ERROR
    assert "65 bytes" in bad.detail and "AAAA" in bad.detail and bad.signalled == Verdict.REJECT
    encoder = by_id["ok-2"]
    assert encoder.reason == Reason.DECODE_ERROR and encoder.encoder is None and str(huge)[:20] in encoder.detail
    assert by_id[safe_part_id("\ud800bad")].reason == Reason.DECODE_ERROR
    assert by_id["ok-3"].reason == Reason.DECODE_ERROR and "capture_time" in by_id["ok-3"].detail
    assert all(f"after-{k}" in by_id for k in range(4))


def test_a_message_over_the_size_limit_and_those_lost_with_it_each_get_a_row_and_a_reject(toy_model, tmp_path, plc):
    """ZeroMQ drops a message over max_message_bytes (and what its sender queued behind it) before the line
    can read it; the pusher numbers its frames, so the next one that arrives gives each lost one its row."""
    raw = line_config(toy_model, tmp_path / "line", plc.address)
    raw["source"]["max_message_bytes"] = 50_000
    live = LiveLine(raw)
    live.send(png(1), part_id="ok-1")
    live.send(np.zeros((200, 200, 3), np.uint8), part_id="huge")     # 120 kB of raw pixels: frame 2
    sent = 2
    while live.parts < 3 and sent < 50:                                # until one arrives after the drop
        time.sleep(0.2)
        sent += 1
        live.send(png(sent), part_id=f"after-{sent}")
    live.wait_parts(sent, timeout=30)
    rows = live.stop()
    assert_one_row_and_ack_each(rows, plc)
    assert len(rows) == sent and rows[0].part_id == "ok-1"             # one row for every frame sent
    assert [parse_frame_ref(r.source_ref) for r in rows] == [(live.pusher.sender, k) for k in range(1, sent + 1)]
    lost = [r for r in rows if r.part_id.startswith("part")]          # under the source's counter ids
    assert lost and [parse_frame_ref(r.source_ref)[1] for r in lost] == list(range(2, 2 + len(lost)))
    for row in lost:
        assert (row.verdict, row.reason, row.signalled) == (Verdict.NO_VERDICT, Reason.DECODE_ERROR, Verdict.REJECT)
        assert "never arrived" in row.detail


def test_frames_the_last_run_never_recorded_get_their_rows_at_the_next_start(toy_model, tmp_path, plc):
    """A kill or a power cut loses what the line had received but not yet recorded; the next run resumes each
    numbered sender's count from the ledger, so the sender's next frame shows them."""
    raw = line_config(toy_model, tmp_path / "line", plc.address)
    first = LiveLine(raw)
    first.pusher.sender = "camera-7"
    for k in range(3):
        first.send(png(k), part_id=f"run1-{k}")
    first.wait_parts(3)
    first.stop()
    second = LiveLine(raw)
    second.send(png(9), part_id="run2-6", sender="camera-7", frame_id=6)    # frames 4 and 5 never reached it
    second.wait_parts(3)
    rows = second.stop()
    assert_one_row_and_ack_each(rows, plc)
    assert [parse_frame_ref(r.source_ref) for r in rows] == [("camera-7", k) for k in (1, 2, 3, 4, 5, 6)]
    assert [r.part_id for r in rows][3:] == ["part000001", "part000002", "run2-6"]
    assert [r.reason for r in rows[3:5]] == [Reason.DECODE_ERROR] * 2 and "never arrived" in rows[3].detail


def test_row_1_an_unsendable_row_from_an_older_build_is_marked_alarmed_and_never_blocks_a_start(toy_model, tmp_path,
                                                                                             plc):
    storage = tmp_path / "line"
    storage.mkdir()
    with Ledger(storage / "ledger.sqlite") as ledger:   # a row the old runtime wrote, then died on
        part = PartRecord(part_id="X" * 65, recipe="default", capture_time=time.time())
        part.decide(Verdict.NO_VERDICT, Reason.WARMUP)
        part.signalled = Verdict.REJECT
        ledger.reserve(part, model_hash="m", config_hash="c", calibration_version="0")
    for start in range(2):
        live = LiveLine(line_config(toy_model, storage, plc.address))
        live.send(png(start), part_id=f"start-{start}")
        live.wait_parts(1)
        rows = live.stop()
        assert rows[-1].part_id == f"start-{start}" and rows[-1].acked
        assert any("can never be sent" in alarm for alarm in live.line.stats.alarms) == (start == 0)
    assert "1..64 bytes" in rows[0].unsendable and not rows[0].acked
    with Ledger.open_readonly(storage / "ledger.sqlite") as reader:
        assert reader.unacked() == []


def test_row_3_test_fire_with_a_100_character_id_is_refused_and_the_line_runs_on(live, plc):
    reply = live.control({"cmd": "test_fire", "part_id": "T" * 100})
    assert not reply["ok"] and "test fire refused" in reply["error"] and "100 bytes" in reply["error"]
    reply = live.control({"cmd": "test_fire", "part_id": "TEST-ok"})
    assert reply["ok"] and reply["acked"]
    live.send(png(1), part_id="next")
    live.wait_parts(2)
    rows = live.stop()
    assert [r.part_id for r in rows] == ["TEST-ok", "next"]
    assert_one_row_and_ack_each(rows, plc)


# ----------------------------------------------------------------- row 4: non-finite numbers

@pytest.mark.parametrize("threshold", [".nan", ".inf", "-.inf", "1e308", "0", "-1"])
def test_row_4_a_yaml_threshold_that_is_not_finite_and_sane_is_a_one_line_error(toy_model, tmp_path, threshold):
    raw = line_config(toy_model, tmp_path / "line", "tcp://127.0.0.1:1")
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(raw).replace("threshold: 1.0", f"threshold: {threshold}"))
    with pytest.raises(ConfigError, match="recipes.default.threshold") as error:
        load_config(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("threshold", [math.nan, math.inf, 1e308])
def test_row_4_apply_of_a_non_finite_threshold_over_the_socket_is_refused(live, threshold):
    calibration = {"version": 1, "recipes": {"default": {"threshold": threshold}}}
    reply = live.control({"cmd": "apply", "calibration": calibration})   # json.dumps writes NaN / Infinity
    expected = "threshold" if math.isfinite(threshold) else "is not a JSON number"   # refused as it is parsed
    assert not reply["ok"] and expected in reply["error"]
    assert live.line.inspector.recipes["default"].threshold == 1.0


class _Scored:
    def __init__(self, score):
        self.raw, self.score, self.feature = score, score, None


class _Prepared:
    feature = None


@pytest.mark.parametrize("score, threshold", [(math.nan, 1.0), (math.inf, 1.0), (0.5, math.nan),
                                              (0.5, math.inf), (np.float32("nan"), 1.0)])
def test_row_4_a_non_finite_score_or_threshold_never_decides_a_verdict(score, threshold):
    part = PartRecord(part_id="p", recipe="default", capture_time=0.0)
    part, prepared, result = verdict_from_pool(part, _Prepared(), threshold, lambda: _Scored(score))
    assert part.verdict == Verdict.NO_VERDICT and part.reason == Reason.ENGINE_ERROR
    assert "not finite" in part.detail and prepared is None and result is None


# ----------------------------------------------------------------- row 5: the technician token

def test_row_5_an_empty_or_short_token_refuses_every_change(tmp_path):
    calls = []
    for token in ("", "1234"):
        server = ControlServer(tmp_path / "c.sock", token, lambda request: calls.append(request) or {})
        try:
            for sent in (None, "", token):
                reply = server.dispatch({"cmd": "pool_purge", **({} if sent is None else {"token": sent})})
                assert not reply["ok"] and reply["denied"]
            assert server.dispatch({"cmd": "status"})["ok"]
        finally:
            server.close()
    assert calls == [{"cmd": "status"}, {"cmd": "status"}]


def test_row_5_token_is_written_atomically_and_an_empty_one_is_replaced(tmp_path, monkeypatch):
    path = token_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("")                                    # what a full disk left behind before
    token = ensure_token(tmp_path)
    assert len(token) == 32 and path.read_text().strip() == token and path.stat().st_mode & 0o777 == 0o640
    path.unlink()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("musc_edge.edge.runtime.calibration_state.os.fsync", full)
    with pytest.raises(OSError, match="No space"):
        ensure_token(tmp_path)
    assert not path.exists() and not list(path.parent.glob("*.tmp"))


def test_row_5_a_line_whose_token_cannot_be_written_refuses_changes(toy_model, tmp_path, plc, monkeypatch):
    monkeypatch.setattr("musc_edge.edge.runtime.line.ensure_token", lambda storage: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    live = LiveLine(line_config(toy_model, tmp_path / "line", plc.address))
    try:
        reply = request_without_token(live)
        assert not reply["ok"] and reply["denied"]
        assert any("technician token could not be written" in alarm for alarm in live.line.stats.alarms)
    finally:
        live.stop()


def request_without_token(live: LiveLine) -> dict:
    from musc_edge.edge.runtime.control import request
    return request(live.storage / "control.sock", {"cmd": "pool_purge", "all": True, "token": ""})


# ----------------------------------------------------------------- rows 6-8: authority and the snapshot

def calibration(version: int, threshold: float) -> Calibration:
    return Calibration(version=version, recipes={"default": {"threshold": threshold}})


def commit(live: LiveLine, new: Calibration) -> dict:
    store = CalibrationStore(live.storage, read_audit_key(live.storage))
    with store.lock():
        return store.commit(new, who="tester", action="threshold.apply", reason="test", old=None, create=True,
                            apply_live=lambda payload: {k: v for k, v in live.control(
                                {"cmd": "apply", "calibration": payload}).items() if k != "ok"})


def test_row_6_apply_needs_an_audited_newer_version_and_the_runtime_records_what_it_applied(live):
    invented = live.control({"cmd": "apply", "calibration": calibration(7, 0.5).model_dump()})
    assert not invented["ok"] and "not the stored v0007.json" in invented["error"]
    assert commit(live, calibration(1, 0.5))["version"] == 1
    assert commit(live, calibration(2, 0.7))["version"] == 2
    replayed = live.control({"cmd": "apply", "calibration": calibration(1, 0.5).model_dump()})
    assert not replayed["ok"] and "replay" in replayed["error"]
    same = live.control({"cmd": "apply", "calibration": calibration(2, 0.7).model_dump()})
    assert not same["ok"] and "replay" in same["error"]
    assert live.line.in_force.version == "2" and live.line.inspector.recipes["default"].threshold == 0.7
    records = CalibrationStore(live.storage).audit.records()
    applied = [r for r in records if r["action"] == "runtime.applied"]
    assert [r["new"]["version"] for r in applied] == [1, 2]
    assert all(r["who"].startswith("runtime:") and r["result_of"] is not None for r in applied)
    assert CalibrationStore(live.storage).audit.verify().ok


def test_row_7_a_hand_edited_current_json_refuses_to_start(toy_model, tmp_path, plc):
    live = LiveLine(line_config(toy_model, tmp_path / "line", plc.address))
    try:
        commit(live, calibration(1, 0.5))
        commit(live, calibration(2, 0.7))
    finally:
        live.stop()
    folder = tmp_path / "line" / "calibration"
    current = folder / "current.json"
    current.write_bytes((folder / "v0001.json").read_bytes())   # an audited, but older, version copied back
    with pytest.raises(CalibrationError, match="older than what this line last applied"):
        Line(parse_config(line_config(toy_model, tmp_path / "line", plc.address)))
    for edit in ({"threshold": 50.0}, ):
        data = json.loads(current.read_text())
        data["recipes"]["default"].update(edit)          # still "version 1"
        current.write_text(json.dumps(data))
        with pytest.raises(CalibrationError, match="differs from v0001.json"):
            Line(parse_config(line_config(toy_model, tmp_path / "line", plc.address)))
    # a stored version file edited to match: the audit record's hash gives it away
    (tmp_path / "line" / "calibration" / "v0001.json").write_bytes(calibration_bytes(calibration(1, 50.0)))
    current.write_bytes(calibration_bytes(calibration(1, 50.0)))
    with pytest.raises(CalibrationError, match="v0001.json differs from the file the audit log recorded for it"):
        Line(parse_config(line_config(toy_model, tmp_path / "line", plc.address)))
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump(line_config(toy_model, tmp_path / "line", plc.address)))
    done = subprocess.run([sys.executable, "-m", "musc_edge.edge.cli", "run", "--config", str(config)],
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err and "audit log" in err, err


def test_row_8_each_row_carries_the_version_and_threshold_it_was_decided_with(live, plc):
    thresholds = {"0": 1.0, "1": 0.5, "2": 3.0, "3": 0.8}
    stop = threading.Event()

    def feed() -> None:
        k = 0
        while not stop.is_set():
            live.send(png(k % 7), part_id=f"p{k}")
            k += 1
            time.sleep(0.02)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        live.wait_parts(8)
        for version in (1, 2, 3):
            commit(live, calibration(version, thresholds[str(version)]))
            time.sleep(0.3)
    finally:
        stop.set()
        feeder.join()
    rows = live.stop()
    scored = [r for r in rows if r.reason in (Reason.OK, Reason.ANOMALY)]
    assert {r.calibration_version for r in scored} >= {"1", "2", "3"}
    assert all(r.threshold == thresholds[r.calibration_version] for r in scored), \
        [(r.seq, r.calibration_version, r.threshold) for r in scored if r.threshold != thresholds[r.calibration_version]]


# ----------------------------------------------------------------- row 9: the pixel budget

def test_row_9_a_decompression_bomb_is_refused_on_its_header_before_decoding(live, plc, monkeypatch):
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 10_000
    decoded = []
    real = __import__("cv2").imdecode
    monkeypatch.setattr("musc_edge.edge.mediaio.cv2.imdecode", lambda *a: decoded.append(1) or real(*a))
    live.send(bomb, part_id="bomb")
    live.send(png(1), part_id="after")
    live.wait_parts(2)
    rows = live.stop()
    assert_one_row_and_ack_each(rows, plc)
    row = {r.part_id: r for r in rows}["bomb"]
    assert row.reason == Reason.DECODE_ERROR and "30000 x 30000" in row.detail and "pixel budget" in row.detail
    assert len(decoded) == 1    # only the good part was decoded


def test_row_9_every_format_is_held_to_the_budget_also_past_the_source():
    import cv2

    from musc_edge.edge.mediaio import declared_size
    for suffix in (".png", ".jpg", ".bmp"):
        data = cv2.imencode(suffix, np.zeros((30, 50, 3), np.uint8))[1].tobytes()
        assert declared_size(data) == (30, 50), suffix
    part = PartRecord(part_id="p", recipe="default", capture_time=0.0, raw=png_declaring(1 << 15, 1 << 14))
    with pytest.raises(DecodeError, match="pixel budget"):
        decode_part(part)


# ----------------------------------------------------------------- row 10: stop_line

@pytest.mark.parametrize("link", ["zmq", "serial"])
def test_row_10_stop_line_reaches_the_plc_on_both_links(toy_model, tmp_path, link):
    sim = PlcSimulator.on_zmq("tcp://127.0.0.1:*") if link == "zmq" else PlcSimulator.on_pty()
    with sim:
        raw = line_config(toy_model, tmp_path / "line", sim.address, fail_safe="stop_line")
        if link == "serial":
            raw["link"] = {"type": "serial", "url": sim.address, "heartbeat_interval_s": 0.2}
        live = LiveLine(raw)
        live.send(b"\x89PNG\r\n\x1a\n broken", part_id="broken-7")
        live.wait_parts(1)
        wait_for(lambda: sim.stop_reasons(), 10, "the PLC to get STOP_LINE")
        rows = live.stop()
        assert sim.stop_reasons() == ["no verdict: part broken-7 (decode_error)"]
        assert rows[0].signalled == Verdict.REJECT and live.line.link is not None
        assert sim.counters().stop_lines >= 1


def test_row_10_a_stop_request_is_repeated_until_the_plc_acknowledges_it():
    from musc_edge.edge.links import open_link
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as sim:
        sim.silence(1.0)                                    # the cable is out for a second
        with open_link({"type": "zmq", "endpoint": sim.address}) as link:
            link.send_stop_line("silent PLC")
            wait_for(lambda: link.health().stop_lines_acked == 1, 15, "the STOP_LINE ack")
            assert link.health().stop_lines_sent >= 2
        assert sim.stop_reasons() == ["silent PLC"]


def test_row_10_plc_sim_prints_the_stop_request(tmp_path):
    import socket

    from musc_edge.edge.links import open_link
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    sim = subprocess.Popen([sys.executable, "-m", "musc_edge.edge.cli", "plc-sim", "--link", "zmq", "--endpoint", endpoint,
                            "--duration", "4", "--report-every", "0"], env={"PYTHONPATH": str(ROOT)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening" in sim.stdout.readline()
        with open_link({"type": "zmq", "endpoint": endpoint}) as link:
            link.send_stop_line("operator test")
            wait_for(lambda: link.health().stop_lines_acked == 1, 10, "the STOP_LINE ack")
        out = sim.communicate(timeout=20)[0]
    finally:
        sim.kill()
    assert "plc-sim: STOP LINE requested: operator test" in out and "stop_lines=1" in out


# ----------------------------------------------------------------- row 11: reseed validates first

def test_row_11_reseed_of_a_2d3d_recipe_is_refused_before_the_pool_changes(toy_model, tmp_path, plc):
    raw = line_config(toy_model, tmp_path / "line", plc.address)
    raw["recipes"]["default"]["modality"] = "2d+3d"
    line = Line(parse_config(raw))
    pool = line.inspector.recipes["default"].pool
    before = pool.size
    from musc_edge.edge.runtime.control import ControlError
    images = tmp_path / "images"   # images without their point clouds: a scan pool cannot be seeded from them
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(png(i))
    with pytest.raises(ControlError, match="reseed refused, the pool is unchanged: no point cloud for"):
        line._handle_control({"cmd": "pool_reseed", "recipe": "default", "folder": str(images)})
    assert pool.size == before


# ----------------------------------------------------------------- row 12: disk full and bad storage

def test_row_12_disk_full_stops_the_line_with_one_line_and_loses_nothing(live, plc, monkeypatch):
    live.send(png(1), part_id="before")
    live.wait_parts(1)
    real = Ledger.reserve

    def full(self, part, **kwargs):
        if part.part_id == "when-full":
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, part, **kwargs)
    monkeypatch.setattr(Ledger, "reserve", full)
    live.send(png(2), part_id="when-full")
    live.thread.join(timeout=30)
    assert isinstance(live.error, LineStopped) and "disk is full" in str(live.error)
    assert "\n" not in str(live.error)
    rows = live.line.ledger_rows()
    assert [r.part_id for r in rows] == ["before"] and rows[0].acked
    assert not [v for v in plc.received() if v.part_id == "when-full"]   # nothing signalled without a row
    live.error = None


def test_row_12_pool_temp_files_are_removed_at_start_and_not_left_by_a_failed_save(toy_model, tmp_path, plc,
                                                                                   monkeypatch):
    from musc_edge.edge.runtime import pool_store
    pools = tmp_path / "line" / "pools"
    pools.mkdir(parents=True)
    stale = pools / "default.npz.4242.1.tmp"
    stale.write_bytes(b"half a pool")
    inspector = Inspector(parse_config(line_config(toy_model, tmp_path / "line", plc.address)))
    inspector.restore_pools()
    assert not stale.exists()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pool_store.np, "savez", full)
    with pytest.raises(OSError):
        inspector.save_pools()
    assert list(pools.iterdir()) == []


def test_row_12_storage_dir_that_is_a_file_and_duplicate_yaml_keys_are_one_line_errors(toy_model, tmp_path):
    (tmp_path / "a-file").write_text("")
    raw = line_config(toy_model, tmp_path / "a-file", "tcp://127.0.0.1:1")
    with pytest.raises(ConfigError, match="storage.dir: exists and is not a folder") as error:
        parse_config(raw)
    assert "\n" not in str(error.value)
    path = tmp_path / "dup.yaml"
    text = yaml.safe_dump(line_config(toy_model, tmp_path / "line", "tcp://127.0.0.1:1"))
    path.write_text(text + "recipes: {}\n")
    with pytest.raises(ConfigError, match="duplicate key 'recipes' at line") as error:
        load_config(path)
    assert "\n" not in str(error.value)
