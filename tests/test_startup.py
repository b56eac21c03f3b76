"""Start-up and end of ``musc-edge run`` / ``view`` (issue 25 rows 3 and 9, issue 21 item 1): a reject link or
view that cannot listen stops the start with one line naming the port and what holds it; a line whose source
cannot run exits non-zero; a replay ends with a line that says so, or replays forever with ``loop: true``."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from musc_edge.edge.cli import main
from musc_edge.edge.config import parse_config
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.runtime.line import Line, StartupError
from musc_edge.edge.runtime.storage_lock import StorageLock
from musc_edge.edge.sources.replay import ReplayConfig, ReplaySource

from .test_runtime import make_parts

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def held_port():
    """A port some other process-like holder listens on (this process: its pid is what must be named)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def no_signal_handlers(monkeypatch):
    """`run` installs SIGINT/SIGTERM handlers for the process (in a test they would outlive it) and prints
    status lines to the stderr of the moment it was imported."""
    from musc_edge.edge.runtime import simulated

    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(simulated, "_status_printer", lambda: (lambda text: None))


def write_config(tmp_path: Path, toy_model: Path, parts: Path, link: dict, **sections) -> Path:
    raw = {"line": {"deadline_ms": 3000, "queue_size": 4},
           "model": {"path": str(toy_model), "size": 112, "blocks": [6, 9]},
           "recipes": {"default": {"threshold": 1.0, "pool": {"capacity": 10, "min_size": 4}}},
           "source": {"type": "replay", "path": str(parts), "pattern": "*/*.png", "rate": 20.0},
           "link": {"heartbeat_interval_s": 0.2, "silence_alarm_s": 0.6, **link},
           "storage": {"dir": str(tmp_path / "line"), "archive": {"enabled": False}}, **sections}
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# -- ports ----------------------------------------------------------------------------------------------------
def test_run_refuses_to_start_when_its_modbus_port_is_taken(toy_model, tmp_path, held_port, capsys,
                                                            no_signal_handlers):
    """Row 3: the line used to run 83 parts with `link DOWN`, nothing acknowledged, and exit 0."""
    config = write_config(tmp_path, toy_model, tmp_path, {"type": "modbus-tcp", "host": "127.0.0.1",
                                                          "port": held_port})
    assert main(["run", "--config", str(config)]) == 3
    line = one_line(capsys.readouterr().err)
    assert f"cannot start: link.port: port {held_port} on 127.0.0.1 is in use by pid {os.getpid()}" in line
    assert not (tmp_path / "line" / "ledger.sqlite").exists()


def test_run_refuses_to_start_when_its_view_port_is_taken(toy_model, tmp_path, held_port, capsys,
                                                          no_signal_handlers):
    config = write_config(tmp_path, toy_model, tmp_path, {"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"},
                          view={"enabled": True, "port": held_port})
    assert main(["run", "--config", str(config)]) == 3
    assert f"cannot start: view.port: port {held_port} on 127.0.0.1 is in use" in one_line(capsys.readouterr().err)


def test_a_line_whose_modbus_port_is_taken_does_not_start(toy_model, tmp_path, held_port):
    """The line's own check (also when it is run without the command line)."""
    config = parse_config(yaml.safe_load(write_config(
        tmp_path, toy_model, tmp_path, {"type": "modbus-tcp", "host": "127.0.0.1", "port": held_port}).read_text()))
    with pytest.raises(StartupError, match=f"link.port: port {held_port} on 127.0.0.1 is in use"):
        Line(config).run()


def test_the_view_refuses_a_taken_port_in_one_line(tmp_path, held_port, capsys):
    assert main(["view", "--dir", str(tmp_path), "--port", str(held_port)]) == 3
    assert f"cannot start: view.port: port {held_port} on 127.0.0.1 is in use" in one_line(capsys.readouterr().err)


# -- one line per storage directory ---------------------------------------------------------------------------
def test_a_second_line_on_the_same_storage_does_not_start_and_names_the_first(toy_model, tmp_path, capsys,
                                                                               no_signal_handlers):
    """Another source, so no port tells the two apart: both would write one ledger and one pool file, and the
    second would repair the first one's half-done calibration changes at its start."""
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        link = {"type": "zmq", "endpoint": plc.address}
        first = Line(parse_config(yaml.safe_load(
            write_config(tmp_path, toy_model, make_parts(tmp_path / "a", 6), link).read_text())))
        second = write_config(tmp_path, toy_model, make_parts(tmp_path / "b", 6), link)
        assert main(["run", "--config", str(second)]) == 3
        err = one_line(capsys.readouterr().err)
        assert f"cannot start: storage.dir {tmp_path / 'line'} is in use by another running line (pid {os.getpid()}, " \
               "since " in err
        assert not (tmp_path / "line" / "ledger.sqlite").exists()
        assert first.run().parts == 6                     # the first line is untouched, and frees the storage
        assert main(["run", "--config", str(second)]) == 0


def test_the_storage_lock_is_held_until_released(tmp_path):
    held = StorageLock.acquire(tmp_path)
    with pytest.raises(StartupError, match=f"in use by another running line \\(pid {os.getpid()}, since "):
        StorageLock.acquire(tmp_path)                     # another open file: flock refuses it in one process too
    held.release()
    held.release()                                        # idempotent
    StorageLock.acquire(tmp_path).release()


def test_a_killed_line_leaves_its_storage_free(toy_model, tmp_path):
    """The kernel drops the lock with the process: after ``kill -9`` (or a power cut) nothing needs cleaning."""
    raw = yaml.safe_load(write_config(tmp_path, toy_model, make_parts(tmp_path / "a", 3),
                                      {"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"}).read_text())
    raw["source"]["loop"] = True                          # replays until killed
    (tmp_path / "line.yaml").write_text(yaml.safe_dump(raw))
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.Popen([sys.executable, "-m", "musc_edge.edge.cli", "run", "--config",
                               str(tmp_path / "line.yaml")], env={**os.environ, "PYTHONPATH": str(root)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "line" / "runtime.lock"
    try:
        deadline = time.monotonic() + 60
        while not (lock.exists() and f"pid {killed.pid}," in lock.read_text()):
            assert killed.poll() is None and time.monotonic() < deadline, "the line did not take its storage"
            time.sleep(0.05)
        with pytest.raises(StartupError, match=f"is in use by another running line \\(pid {killed.pid},"):
            Line(parse_config(raw))
    finally:
        killed.kill()
        killed.wait()
    line = Line(parse_config(raw))                          # starts: the storage is free again
    assert f"pid {os.getpid()}," in lock.read_text()
    line.telemetry.close()


# -- how a line ends ------------------------------------------------------------------------------------------
def test_a_replay_of_a_missing_folder_exits_non_zero_naming_it(toy_model, tmp_path, capsys, no_signal_handlers):
    """Issue 21: a source that failed used to end the line with exit 0 (systemd did not restart it)."""
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        config = write_config(tmp_path, toy_model, tmp_path / "nonexistent", {"type": "zmq", "endpoint": plc.address})
        assert main(["run", "--config", str(config)]) == 3
    err = capsys.readouterr().err
    assert "line stopped: frame source replay of" in err and "nonexistent' does not exist" in err


def test_a_finished_replay_says_so_and_exits_zero(toy_model, tmp_path, capsys, no_signal_handlers):
    parts = make_parts(tmp_path / "parts", 6)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        config = write_config(tmp_path, toy_model, parts, {"type": "zmq", "endpoint": plc.address})
        assert main(["run", "--config", str(config)]) == 0
    assert f"musc-edge run: replay of {parts} finished after 6 parts" in capsys.readouterr().err


# -- replay as a development camera ---------------------------------------------------------------------------
def frames(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([i]))
    return folder


def test_a_looping_replay_goes_on_past_the_end_of_its_folder_until_closed(tmp_path):
    source = ReplaySource(ReplayConfig(path=str(frames(tmp_path / "f", 3)), rate=None, loop=True))
    assert not source.finite
    refs = []
    with source:
        for part in source.parts():
            refs.append(Path(part.source_ref).name)
            if len(refs) == 8:
                source.close()
    assert refs == ["000.png", "001.png", "002.png"] * 2 + ["000.png", "001.png"]


def test_a_replay_is_finite_without_loop_or_with_a_limit(tmp_path):
    folder = str(frames(tmp_path / "f", 3))
    assert ReplaySource(ReplayConfig(path=folder)).finite
    limited = ReplaySource(ReplayConfig(path=folder, rate=None, loop=True, limit=5))
    assert limited.finite
    with limited:
        assert len(list(limited.parts())) == 5


def test_loop_must_be_true_or_false():
    with pytest.raises(ValueError, match="'loop' must be true or false"):
        ReplayConfig(path="x", loop="yes")


def test_an_unforeseen_fault_at_start_is_one_line_and_a_non_zero_exit(toy_model, tmp_path, capsys, monkeypatch,
                                                                      no_signal_handlers):
    from musc_edge.edge.runtime.inspector import Inspector

    def broken(self, *args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(Inspector, "restore_pools", broken)
    config = write_config(tmp_path, toy_model, tmp_path, {"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"})
    assert main(["run", "--config", str(config)]) == 4
    line = one_line(capsys.readouterr().err)
    assert "line stopped by an internal fault: AttributeError: 'NoneType' object has no attribute 'shape'" in line
    traceback = tmp_path / "line" / "last-fault.txt"
    assert f"(traceback: {traceback})" in line and "restore_pools" in traceback.read_text()


def test_a_config_error_still_exits_2(toy_model, tmp_path, capsys, no_signal_handlers):
    config = write_config(tmp_path, toy_model, tmp_path, {"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"})
    raw = yaml.safe_load(config.read_text())
    raw["model"]["blocks"] = [99]
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", "--config", str(config)]) == 2
    assert "model.blocks [99]" in one_line(capsys.readouterr().err)


def test_only_sources_that_end_by_themselves_are_finite(tmp_path):
    """A live source whose frames stop is a failure the line reopens; a file's end is the end of the line."""
    from musc_edge.edge.sources.opencv_camera import OpenCVCameraConfig, OpenCVCameraSource
    from musc_edge.edge.sources.zmq_source import ZmqSource, ZmqSourceConfig

    video = tmp_path / "conveyor.avi"
    video.write_bytes(b"")
    assert OpenCVCameraSource(OpenCVCameraConfig(device=str(video))).finite
    assert not OpenCVCameraSource(OpenCVCameraConfig(device=0)).finite
    assert not ZmqSource(ZmqSourceConfig(endpoint="tcp://127.0.0.1:5555")).finite


def test_a_taken_prometheus_port_is_an_alarm_and_a_doctor_warning_not_a_stop(toy_model, tmp_path, held_port):
    """Metrics matter less than inspecting: the line starts without its endpoint, but says so."""
    from musc_edge.edge.doctor import run_checks

    path = write_config(tmp_path, toy_model, tmp_path, {"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"},
                        telemetry={"prometheus": {"enabled": True, "port": held_port}})
    line = Line(parse_config(yaml.safe_load(path.read_text())))
    try:
        assert any(f"no Prometheus exporter on 127.0.0.1:{held_port}" in a for a in line.stats.alarms)
    finally:
        line.telemetry.close()
    check = next(c for c in run_checks(path) if c.name == "port telemetry.prometheus.port")
    assert check.status == "warn" and f"is in use by pid {os.getpid()}" in check.detail


def test_a_view_that_ends_while_the_line_runs_is_an_alarm(toy_model, tmp_path, monkeypatch, caplog,
                                                          no_signal_handlers):
    """Row 3: the view used to die (address in use) while the line ran on, and nothing said so."""
    from musc_edge.edge import cli

    # A stand-in view process that ends at once (as one that lost a race for its port would).
    monkeypatch.setattr(cli, "_start_view", lambda path: subprocess.Popen([sys.executable, "-c", "exit(5)"]))
    parts = make_parts(tmp_path / "parts", 6)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        config = write_config(tmp_path, toy_model, parts, {"type": "zmq", "endpoint": plc.address},
                              view={"enabled": True})
        assert main(["run", "--config", str(config)]) == 0
    assert "ALARM: operator view stopped (exit 5); the line runs on without it" in caplog.text


def test_a_replayed_frame_that_breaks_a_reader_is_that_frames_no_verdict_not_the_replays_end(tmp_path,
                                                                                            monkeypatch):
    """A finite source that raised would stop the line: the replay turns its readers' faults into parts."""
    import struct

    from musc_edge.edge.pointcloud import io as cloud_io
    from musc_edge.edge.sources.base import DecodeError, decode_part

    folder = frames(tmp_path / "f", 3)
    over_budget = ReplayConfig.over_budget

    def fragile_header_check(self, raw):
        if raw.endswith(b"\x01"):
            raise struct.error("unpack requires a buffer of 4 bytes")
        return over_budget(self, raw)

    def broken_reader(path, *args, **kwargs):
        raise MemoryError(f"cannot allocate the cloud of {path}")

    monkeypatch.setattr(ReplayConfig, "over_budget", fragile_header_check)
    monkeypatch.setattr(cloud_io, "read_cloud", broken_reader)
    source = ReplaySource(ReplayConfig(path=str(folder), rate=None, cloud_path="{stem}.tiff"))
    with source:
        parts = list(source.parts())
    assert len(parts) == 3
    assert all("cloud unreadable: MemoryError" in p.detail for p in parts)
    with pytest.raises(DecodeError, match="frame header unreadable: error: unpack requires"):
        decode_part(parts[1])
