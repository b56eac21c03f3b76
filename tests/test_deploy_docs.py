"""deploy/README.md runs as written: every command of its fenced blocks either runs here, in the documented order,
against a simulated line (``musc-edge plc-sim`` over Modbus TCP on loopback, a folder of synthetic parts replayed
as the camera), or is named in :data:`SKIPPED` with the reason it needs the device. The commands are taken from
the document itself; the test changes only paths and ports, through :func:`command_substitutions` and
:data:`CONFIG_SUBSTITUTIONS`, so a documented command that changes or stops working fails here."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from musc_edge.edge.ledger import Ledger
from musc_edge.edge.synthetic import generate_set

from .doc_blocks import commands, fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "deploy" / "README.md"
DEFAULT_MODEL = ROOT / "models" / "dinov2_vits14_musc.onnx"
SIMULATED_LINE = "deploy/replay-modbus-tcp.yaml"
SHIPPED = ROOT / SIMULATED_LINE
DOCUMENTED_LINK_PORT = 1502              # link.port of deploy/replay-modbus-tcp.yaml, in the plc-sim command
PARTS = 80                               # 20 s of parts at the example's 4 parts/s: the line outlives the commands
TIMEOUT_S = 120                          # per command and per wait: generous, the machine may be loaded

# Documented commands this machine cannot run as written, each with why. A command in the document that is neither
# here nor in CHECKS fails test_every_documented_command_is_run_or_named_as_skipped.
SKIPPED = {
    "sudo deploy/install-jetson.sh": "root: apt packages, a system user, /opt/musc-edge (tests/test_install.py)",
    "musc-export trt models/dinov2_vits14_musc.onnx": "needs TensorRT (JetPack); tests/test_tensorrt.py",
    "sudo nvpmodel -q": "a Jetson's power modes, root",
    "sudo nvpmodel -m 0": "a Jetson's power modes, root",
    "sudo jetson_clocks": "a Jetson's clocks, root",
    "sudo jetson_clocks --show": "a Jetson's clocks, root",
    "sudo systemctl start musc-edge": "the installed systemd unit, root",
    "journalctl -u musc-edge -f": "the installed unit's journal; -f follows it until interrupted",
    "systemctl show musc-edge -p NRestarts -p WatchdogUSec": "the installed systemd unit",
    "sudo apt install gir1.2-aravis-0.8 aravis-tools python3-gi": "root: system packages",
    "sudo apt install libgirepository1.0-dev libcairo2-dev && pip install -e '/opt/musc-edge[genicam]'":
        "root: system packages and the device's install in /opt/musc-edge",
    "echo 'net.core.rmem_max=33554432\nnet.core.rmem_default=33554432' | sudo tee /etc/sysctl.d/60-gige-camera.conf"
    " && sudo sysctl --system": "root: kernel settings",
}

# The keys of deploy/replay-modbus-tcp.yaml that the test's copy changes, and why; every other key is as shipped.
CONFIG_SUBSTITUTIONS = {
    "model.path": "the toy feature model (tests/toymodel.py): the default one takes seconds a part on a loaded CPU",
    "source.path": "synthetic parts (edge_app/synthetic.py): the example's MVTec AD folder is not in the repository",
    "storage.dir": "under the test's tmp_path, not the checkout",
    "link.port": "a free loopback port",
    "telemetry.prometheus.port": "a free loopback port",
    "view.port": "a free loopback port (the example leaves the default, 8750)",
}


def command_substitutions(config: Path, link_port: int) -> dict[str, str]:
    """Documented text -> the test's: the only changes made to a command before it runs."""
    return {
        SIMULATED_LINE: str(config),                 # the shipped config with CONFIG_SUBSTITUTIONS
        "/etc/musc-edge/line.yaml": str(config),     # the device's config (camera-serial.yaml: a camera and a UART)
        f"--port {DOCUMENTED_LINK_PORT}": f"--port {link_port}",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args[0]} exited {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.status, reply.read()


def answers(url: str) -> bool:
    try:
        get(url)
    except urllib.error.URLError as error:
        if isinstance(error.reason, ConnectionRefusedError):
            return False
        raise
    return True


def documented_commands() -> list[str]:
    """Every command of every fenced block of deploy/README.md, once each, in the document's order."""
    return list(dict.fromkeys(c for block in fenced_blocks(DOC.read_text()) for c in commands(block)))


@dataclass
class Session:
    """A shell in the checkout: commands run as written after :func:`command_substitutions`; ``&`` in the
    background (its output in a log file)."""

    tmp_path: Path
    substitutions: dict[str, str]
    storage: Path
    link_port: int
    background: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def argv(self, command: str) -> tuple[list[str], bool]:
        for documented, ours in self.substitutions.items():
            command = command.replace(documented, ours)
        argv = shlex.split(command)
        in_background = argv[-1] == "&"
        argv = argv[:-1] if in_background else argv
        program = Path(sys.executable).parent / argv[0]
        assert program.is_file(), f"{argv[0]} is not installed beside {sys.executable} (pip install -e .)"
        return [str(program), *argv[1:]], in_background

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(self, command: str) -> subprocess.CompletedProcess:
        argv, in_background = self.argv(command)
        assert not in_background
        return subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=TIMEOUT_S)

    def start(self, command: str) -> subprocess.Popen:
        argv, _ = self.argv(command)
        log = self.tmp_path / f"{len(self.logs)}-{Path(argv[0]).name}.log"
        with log.open("w") as out:
            process = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.background[command] = process
        self.logs[command] = log
        return process

    def output(self, command: str) -> str:
        return self.logs[command].read_text()

    def interrupt(self, command: str) -> int:
        """Ctrl-C (SIGINT) to a process this session started; its exit status."""
        process = self.background[command]
        process.send_signal(signal.SIGINT)
        return process.wait(timeout=TIMEOUT_S)

    def close(self) -> None:
        for process in self.background.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)

    def ledger_rows(self) -> list:
        if not (self.storage / "ledger.sqlite").exists():
            return []
        reader = Ledger.open_readonly(self.storage / "ledger.sqlite")
        try:
            return list(reader.iter_rows())
        finally:
            reader.close()


def doctor_failures(checks: list[dict]) -> set[str]:
    return {c["name"] for c in checks if c["status"] == "fail"}


# Without a built default model (`make setup`), doctor without a config fails on exactly that check.
EXPECTED_FAILURES = set() if DEFAULT_MODEL.is_file() else {"feature model"}


def check_doctor(session: Session, command: str) -> None:
    done = session.run(command)
    assert done.returncode == (1 if EXPECTED_FAILURES else 0), done.stdout + done.stderr
    assert f"{len(EXPECTED_FAILURES)} failed" in done.stdout.splitlines()[-1], done.stdout


def check_doctor_json(session: Session, command: str) -> None:
    done = session.run(command)
    report = json.loads(done.stdout)
    assert doctor_failures(report["checks"]) == EXPECTED_FAILURES, done.stdout
    assert report["ok"] is (not EXPECTED_FAILURES) and done.returncode == (1 if EXPECTED_FAILURES else 0)


def check_doctor_config(session: Session, command: str) -> None:
    done = session.run(command)
    assert done.returncode == 0 and "0 failed" in done.stdout.splitlines()[-1], done.stdout + done.stderr
    assert re.search(rf"OK +port link\.port +127\.0\.0\.1:{session.link_port} free", done.stdout), done.stdout
    assert f"{PARTS} frames" in done.stdout, done.stdout       # the substituted source folder was checked


def start_plc(session: Session, command: str) -> None:
    session.start(command)
    wait_for(lambda: "PLC scanning" in session.output(command), "plc-sim to start", session.background[command])


def start_line(session: Session, command: str) -> None:
    line = session.start(command)
    wait_for(lambda: (session.storage / "control.sock").exists(), "the line's control socket", line)
    min_size = yaml.safe_load(SHIPPED.read_text())["recipes"]["default"]["pool"]["min_size"]
    wait_for(lambda: len(session.ledger_rows()) >= min_size + 3, "the pool to fill and parts to be scored", line)


def check_status(session: Session, command: str) -> None:
    done = session.run(command)
    assert done.returncode == 0, done.stderr
    parts = int(re.search(r"^parts (\d+)", done.stdout, re.M).group(1))
    assert parts >= 1 and "pool default" in done.stdout, done.stdout


def check_calibrate_status(session: Session, command: str) -> None:
    done = session.run(command)
    assert done.returncode == 0 and "RUNNING" in done.stdout, done.stdout + done.stderr


def check_view(session: Session, command: str) -> None:
    view = session.start(command)
    pattern = r"on (http://127\.0\.0\.1:\d+/)"
    wait_for(lambda: re.search(pattern, session.output(command)) is not None, "the view's address", view)
    url = re.search(pattern, session.output(command)).group(1)
    # The address is printed once the port is checked free, just before the server binds it: a browser opened
    # at once may be refused for a moment.
    wait_for(lambda: answers(url), "the view to answer", view)
    status, page = get(url)
    assert status == 200 and b"<html" in page
    status, live = get(url + "api/live")
    assert status == 200 and json.loads(live)
    assert session.interrupt(command) == 0, session.output(command)   # Ctrl-C ends it


# What each documented command that runs here must do.
CHECKS: dict[str, Callable[[Session, str], None]] = {
    "musc-edge doctor": check_doctor,
    "musc-edge doctor --config /etc/musc-edge/line.yaml": check_doctor_config,
    "musc-edge doctor --json": check_doctor_json,
    "musc-edge plc-sim --link modbus-tcp --port 1502 &": start_plc,
    "musc-edge doctor --config deploy/replay-modbus-tcp.yaml": check_doctor_config,
    "musc-edge run --config deploy/replay-modbus-tcp.yaml &": start_line,
    "musc-edge status --config deploy/replay-modbus-tcp.yaml": check_status,
    "musc-calibrate status --config deploy/replay-modbus-tcp.yaml": check_calibrate_status,
    "musc-edge view --config deploy/replay-modbus-tcp.yaml": check_view,
}


def test_every_documented_command_is_run_or_named_as_skipped():
    documented = documented_commands()
    unknown = [c for c in documented if c not in CHECKS and c not in SKIPPED]
    assert not unknown, f"deploy/README.md has commands this test neither runs nor skips: {unknown}"
    stale = [c for c in [*CHECKS, *SKIPPED] if c not in documented]
    assert not stale, f"no longer in deploy/README.md: {stale}"
    assert not set(CHECKS) & set(SKIPPED)


@pytest.mark.parametrize("command", list(SKIPPED))
def test_documented_command_that_needs_the_device(command):
    """Each command of SKIPPED shows in the report (``pytest -rs``) with why it does not run here."""
    pytest.skip(f"not run off the device: {command!r}: {SKIPPED[command]}")


def simulated_line_config(tmp_path: Path, model: Path, parts: Path, ports: dict[str, int]) -> Path:
    """deploy/replay-modbus-tcp.yaml with CONFIG_SUBSTITUTIONS, and nothing else, changed."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    assert shipped["link"]["port"] == DOCUMENTED_LINK_PORT
    config = yaml.safe_load(SHIPPED.read_text())
    config["model"]["path"] = str(model)
    config["source"]["path"] = str(parts)
    config["storage"]["dir"] = str(tmp_path / "line")
    config["link"]["port"] = ports["link"]
    config["telemetry"]["prometheus"]["port"] = ports["prometheus"]
    config.setdefault("view", {})["port"] = ports["view"]
    before, after = flatten(shipped), flatten(config)
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == set(CONFIG_SUBSTITUTIONS)
    path = tmp_path / "replay-modbus-tcp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_documented_commands_run_as_written_against_a_simulated_line(tmp_path, toy_model):
    parts = generate_set(tmp_path / "parts", n=PARTS, defect_fraction=0.25, seed=7, size=128) / "test"
    ports = {}
    while len(set(ports.values())) < 3:
        ports = {"link": free_port(), "prometheus": free_port(), "view": free_port()}
    config = simulated_line_config(tmp_path, toy_model, parts, ports)
    session = Session(tmp_path, command_substitutions(config, ports["link"]), tmp_path / "line", ports["link"])
    line_command = "musc-edge run --config deploy/replay-modbus-tcp.yaml &"
    plc_command = "musc-edge plc-sim --link modbus-tcp --port 1502 &"
    ran = []
    try:
        for command in documented_commands():
            if command in SKIPPED:
                continue
            CHECKS[command](session, command)
            ran.append(command)
            if command == line_command:   # while it runs: the metrics the comment promises
                status, metrics = get(f"http://127.0.0.1:{ports['prometheus']}/metrics")
                assert status == 200 and b"musc_parts_total" in metrics
        assert set(ran) == set(CHECKS)

        line = session.background[line_command]
        assert line.wait(timeout=TIMEOUT_S + PARTS) == 0, session.output(line_command)
        assert f"finished after {PARTS} parts" in session.output(line_command)
        rows = session.ledger_rows()
        assert len(rows) == PARTS and all(r.acked for r in rows)
        assert session.interrupt(plc_command) == 0, session.output(plc_command)
        counters = session.output(plc_command).strip().splitlines()[-1]
        assert f"received={PARTS} duplicates=0" in counters, counters
    finally:
        session.close()
