"""`musc-edge doctor` on this (non-Jetson, CPU-only) machine, and the deployment files it goes with."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from musc_edge.edge import doctor
from musc_edge.edge.doctor import Check, doctor_main, run_checks

REPO = Path(__file__).resolve().parents[1]


def by_name(checks: list[Check], name: str) -> Check:
    matches = [c for c in checks if c.name == name]
    assert len(matches) == 1, f"expected one {name!r} check, got {[c.name for c in checks]}"
    return matches[0]


@pytest.fixture
def line_yaml(tmp_path, toy_model):
    """Write a valid line config (replay source, given link) and return its path."""
    def write(link: dict, storage_dir: Path | None = None) -> Path:
        raw = {"model": {"path": str(toy_model), "size": 28, "blocks": [6, 9]},
               "source": {"type": "replay", "path": str(tmp_path)},
               "link": link,
               "storage": {"dir": str(storage_dir or tmp_path / "store"), "archive": {"quota_mb": 10}}}
        path = tmp_path / "line.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path
    return write


@pytest.fixture
def pty_device():
    primary, secondary = os.openpty()
    yield os.ttyname(secondary)
    os.close(primary)
    os.close(secondary)


def test_table_lists_every_check_and_exit_code_follows_failures(monkeypatch, toy_model, capsys):
    monkeypatch.setenv("MUSC_EDGE_MODEL", str(toy_model))
    code = doctor_main([])
    out = capsys.readouterr().out
    checks = run_checks()
    for check in checks:
        assert check.name in out
    rows = [line for line in out.splitlines() if line.split(" ", 1)[0] in ("OK", "WARN", "FAIL")]
    assert len(rows) == len(checks)
    assert len({line.index(c.name) for line, c in zip(rows, checks)}) == 1  # names start in one column
    assert code == (1 if any(c.status == "fail" for c in checks) else 0)
    assert by_name(checks, "feature model").status == "ok"


def test_cpu_only_onnxruntime_is_a_warning_not_a_failure(monkeypatch):
    monkeypatch.setattr("musc_edge.edge.features.available_providers", lambda: ["CPUExecutionProvider"])
    check = doctor.check_providers()
    assert check.status == "warn" and "CPUExecutionProvider" in check.detail and check.hint
    monkeypatch.setattr("musc_edge.edge.features.available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert doctor.check_providers().status == "ok"


def test_missing_model_fails_naming_the_path(monkeypatch, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.onnx"
    monkeypatch.setenv("MUSC_EDGE_MODEL", str(missing))
    check = by_name(run_checks(), "feature model")
    assert check.status == "fail" and str(missing) in check.detail and "musc-export" in check.hint
    assert doctor_main([]) == 1
    assert str(missing) in capsys.readouterr().out


def test_config_blocks_absent_from_the_model_fail_naming_the_key(toy_model):
    check = doctor.check_model(toy_model, blocks=(6, 7))
    assert check.status == "fail" and "model.blocks" in check.detail and "[7]" in check.detail


def test_missing_serial_device_fails_naming_link_url(line_yaml, tmp_path):
    device = tmp_path / "ttyNOPE0"
    check = by_name(run_checks(line_yaml({"type": "serial", "url": str(device)})), "serial device")
    assert check.status == "fail" and "link.url" in check.detail and str(device) in check.detail


def test_loop_url_warns(line_yaml):
    check = by_name(run_checks(line_yaml({"type": "serial", "url": "loop://"})), "serial device")
    assert check.status == "warn" and "loop://" in check.detail


def test_pty_serial_device_passes(line_yaml, pty_device):
    checks = run_checks(line_yaml({"type": "serial", "url": pty_device}))
    assert by_name(checks, "serial device").status == "ok"
    assert by_name(checks, "config").status == "ok"
    assert by_name(checks, "feature model").status == "ok"


def test_zmq_link_has_no_serial_check(line_yaml):
    checks = run_checks(line_yaml({"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"}))
    assert not [c for c in checks if c.name == "serial device"]
    assert by_name(checks, "storage dir").status == "ok"
    assert by_name(checks, "archive quota").status == "ok"


def test_storage_dir_that_cannot_be_created_fails(line_yaml, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    checks = run_checks(line_yaml({"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"}, blocker / "store"))
    check = by_name(checks, "storage dir")
    assert check.status == "fail" and "storage.dir" in check.detail
    assert doctor_main(["--config", str(tmp_path / "line.yaml")]) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_read_only_storage_dir_fails(line_yaml, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    check = by_name(run_checks(line_yaml({"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"}, read_only)),
                    "storage dir")
    assert check.status == "fail" and "not writable" in check.detail


def test_archive_quota_beyond_free_space_warns(tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free / (1 << 20)
    checks = doctor.check_storage(tmp_path, archive_enabled=True, quota_mb=free_mb * 2)
    check = by_name(checks, "archive quota")
    assert check.status == "warn" and "storage.archive.quota_mb" in check.detail


def test_invalid_config_fails_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"source": {"type": "replay", "path": "x"},
                                    "link": {"type": "serial", "url": "loop://", "baudrat": 9600}}))
    checks = run_checks(path)
    check = by_name(checks, "config")
    assert check.status == "fail" and "baudrat" in check.detail
    assert not [c for c in checks if c.name == "serial device"]


def test_control_socket_held_by_a_running_line_warns(tmp_path):
    import socket

    path = tmp_path / "control.sock"
    assert doctor.check_control_socket(path).status == "ok"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        assert doctor.check_control_socket(path).status == "warn"
    assert "stale" in doctor.check_control_socket(path).detail


def test_jetson_without_clock_tools_warns(monkeypatch, tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3\n")
    monkeypatch.setattr(doctor, "TEGRA_RELEASE", release)
    monkeypatch.setattr(doctor, "DEVICE_TREE_MODEL", tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path))
    checks = doctor.check_platform()
    assert checks[0].status == "ok" and "R36" in checks[0].detail
    clocks = checks[1:]
    assert {c.name for c in clocks} == {"nvpmodel -q", "jetson_clocks --show"}
    assert all(c.status == "warn" and "jetson_clocks" in c.hint for c in clocks)


def test_json_output_parses(line_yaml, pty_device, capsys):
    code = doctor_main(["--json", "--config", str(line_yaml({"type": "serial", "url": pty_device}))])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is (code == 0)
    assert {"name", "status", "detail", "hint"} <= set(report["checks"][0])
    assert {c["status"] for c in report["checks"]} <= {"ok", "warn", "fail"}


def test_service_unit_is_notify_with_watchdog_and_restart():
    unit = (REPO / "deploy" / "musc-edge.service").read_text().splitlines()
    settings = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in unit
                if "=" in line and not line.startswith("#")}
    assert settings["Type"] == "notify"
    assert int(settings["WatchdogSec"]) > 0
    # Restarted whatever the exit status, rate-limited: a line that keeps failing at start stays failed.
    assert settings["Restart"] == "always"
    assert int(settings["StartLimitBurst"]) >= 3 and int(settings["StartLimitIntervalSec"]) > \
        int(settings["StartLimitBurst"]) * int(settings["RestartSec"])
    assert "dialout" in settings["SupplementaryGroups"] and settings["User"] == "musc"


def test_install_script_parses():
    script = REPO / "deploy" / "install-jetson.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "set -euo pipefail" in script.read_text()


def test_scoring_backend_is_timed_and_reported(line_yaml):
    check = by_name(run_checks(line_yaml({"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"})), "scoring backend")
    assert check.status == "ok"
    chosen = check.detail.split(" ")[0]
    assert chosen in ("numpy", "onnx-fp32") and "(auto;" in check.detail
    assert all(f"{name} " in check.detail for name in ("numpy", "onnx-fp32", "onnx-int8"))


# -- issue 25 rows 3, 7, 8: ports, the model from the config's folder and the install, the source ------------
def test_a_replay_source_folder_that_does_not_exist_fails(line_yaml, tmp_path):
    config = yaml.safe_load(line_yaml({"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"}).read_text())
    config["source"]["path"] = "/nonexistent/folder"
    (tmp_path / "line.yaml").write_text(yaml.safe_dump(config))
    check = by_name(run_checks(tmp_path / "line.yaml"), "source")
    assert check.status == "fail" and "/nonexistent/folder" in check.detail and "source.path" in check.hint


def test_a_replay_source_with_frames_passes_and_says_how_many(line_yaml, tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    check = by_name(run_checks(line_yaml({"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"})), "source")
    assert check.status == "ok" and "2 frames, once" in check.detail


def test_a_link_port_in_use_fails_naming_the_port_and_the_process_holding_it(line_yaml):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        checks = run_checks(line_yaml({"type": "modbus-tcp", "host": "127.0.0.1", "port": port}))
    check = by_name(checks, "port link.port")
    assert check.status == "fail"
    assert f"127.0.0.1:{port} is in use by pid {os.getpid()}" in check.detail
    assert "link.port" in check.hint


def test_free_link_and_view_ports_pass(line_yaml, tmp_path):
    import socket

    ports = []
    for _ in range(2):   # two ports free a moment ago
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    config = yaml.safe_load(line_yaml({"type": "modbus-tcp", "host": "127.0.0.1", "port": ports[0]}).read_text())
    config["view"] = {"enabled": True, "port": ports[1]}
    (tmp_path / "line.yaml").write_text(yaml.safe_dump(config))
    checks = run_checks(tmp_path / "line.yaml")
    assert by_name(checks, "port link.port").status == "ok"
    assert by_name(checks, "port view.port").status == "ok"


def test_a_relative_model_path_is_found_beside_the_config_from_any_working_directory(toy_model, tmp_path,
                                                                                     monkeypatch):
    """Row 7: the model used to be looked up from the working directory (and the hint said to rebuild it)."""
    folder = tmp_path / "site"
    (folder / "models").mkdir(parents=True)
    for suffix in (".onnx", ".json"):
        shutil.copy(toy_model.with_suffix(suffix), folder / "models" / f"toy{suffix}")
    (folder / "line.yaml").write_text(yaml.safe_dump({
        "model": {"path": "models/toy.onnx", "size": 28, "blocks": [6, 9]},
        "source": {"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"},
        "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:5558"}, "storage": {"dir": str(tmp_path / "store")}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    check = by_name(run_checks(folder / "line.yaml"), "feature model")
    assert check.status == "ok", check.detail
    assert check.detail.startswith(str(folder / "models" / "toy.onnx"))


def test_the_default_model_is_found_in_the_install_from_any_working_directory(default_model, tmp_path,
                                                                              monkeypatch):
    from musc_edge.edge.config import load_config
    from musc_edge.edge.features import default_model_path

    monkeypatch.delenv("MUSC_EDGE_MODEL", raising=False)
    (tmp_path / "line.yaml").write_text(yaml.safe_dump({
        "model": {"path": "models/dinov2_vits14_musc.onnx"},
        "source": {"type": "zmq", "endpoint": "tcp://127.0.0.1:5557"},
        "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:5558"}, "storage": {"dir": str(tmp_path / "store")}}))
    monkeypatch.chdir(tmp_path)
    assert default_model_path() == default_model
    assert load_config(tmp_path / "line.yaml").model.path == default_model
    assert by_name(run_checks(), "feature model").status == "ok"
