"""musc-calibrate against a running line (tiny random model, synthetic good parts, PLC simulator over ZeroMQ):
calibrate for a 1 % false-reject rate, apply while parts flow, roll back, then prove the audit trail."""
from __future__ import annotations

import io
import json
import re
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from musc_edge.calibration.cli import main
from musc_edge.edge.config import parse_config
from musc_edge.edge.ledger import Ledger
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import Reason, Verdict
from musc_edge.edge.runtime.control import request
from musc_edge.edge.runtime.line import Line
from musc_edge.edge.synthetic import generate_set

from .doc_blocks import block_after, commands

CONFIG_THRESHOLD = 5.0   # far above any score: before calibration every scored part is accepted


def line_config(model: Path, parts: Path, storage: Path, endpoint: str) -> dict:
    return {
        "line": {"deadline_ms": 4000, "queue_size": 8},
        "model": {"path": str(model), "size": 112, "blocks": [6, 9]},
        "recipes": {"default": {"threshold": CONFIG_THRESHOLD,
                                "pool": {"capacity": 24, "min_size": 6}}},
        "source": {"type": "replay", "path": str(parts), "pattern": "*/*.png", "rate": 12.0, "shuffle": True,
                   "seed": 2, "loop": True, "limit": 5000},
        "link": {"type": "zmq", "endpoint": endpoint, "heartbeat_interval_s": 0.2, "silence_alarm_s": 2.0},
        "storage": {"dir": str(storage), "archive": {"enabled": False}},
    }


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def ledger_rows(storage: Path) -> list:
    reader = Ledger.open_readonly(storage / "ledger.sqlite")
    try:
        return list(reader.iter_rows())
    finally:
        reader.close()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def running_line(toy_model, tmp_path):
    """A line replaying 40 good synthetic parts in a loop; yields (config path, storage, line, plc)."""
    parts = generate_set(tmp_path / "parts", n=40, defect_fraction=0.0, seed=5, size=128) / "test"
    storage = tmp_path / "line"
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        raw = line_config(toy_model, parts, storage, plc.address)
        config_path = tmp_path / "line.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        line = Line(parse_config(raw))
        thread = threading.Thread(target=line.run, name="line-under-test", daemon=True)
        thread.start()
        try:
            socket = storage / "control.sock"
            wait_for(socket.exists, 30, "the control socket")
            wait_for(lambda: request(socket, {"cmd": "status"})["recipes"]["default"]["pool"]["size"] >= 24, 90,
                     "the pool to fill")
            yield config_path, storage, line, plc
        finally:
            line.stop()
            thread.join(timeout=30)
        assert not thread.is_alive(), "the line did not stop"


def parts_after(storage: Path, seq: int, n: int) -> list:
    wait_for(lambda: len([r for r in ledger_rows(storage) if r.seq > seq]) >= n, 60, f"{n} more parts")
    return [r for r in ledger_rows(storage) if r.seq > seq]


def test_calibrate_apply_live_rollback_and_audit(running_line, capsys):
    config_path, storage, line, plc = running_line
    cfg = ("--config", str(config_path))

    code, out, _ = cli(capsys, "threshold", "suggest", *cfg, "--target-frr", "0.01", "--json")
    assert code == 0
    suggested = json.loads(out)
    assert suggested["current"] == CONFIG_THRESHOLD and suggested["described"].startswith("24 pool members")
    pool_scores = request(storage / "control.sock", {"cmd": "pool_scores"})["scores"]
    assert sorted(pool_scores)[len(pool_scores) // 2] < suggested["threshold"] < CONFIG_THRESHOLD

    code, out, err = cli(capsys, "threshold", "apply", "--yes", *cfg, "--target-frr", "0.01", "--reason", "first calibration")
    assert code == 0, err
    assert "in force" in out and "recipes.default.threshold: 5 ->" in out
    applied = json.loads((storage / "calibration" / "v0001.json").read_text())["recipes"]["default"]["threshold"]
    applied_at = ledger_rows(storage)[-1].seq
    after_apply = parts_after(storage, applied_at, 12)
    # The line takes the change between two parts: once v1 appears, every later part is decided with it.
    versions = [r.calibration_version for r in ledger_rows(storage) if r.reason != Reason.TEST_FIRE]
    first_v1 = versions.index("1")
    assert set(versions[:first_v1]) == {"0"} and set(versions[first_v1:]) == {"1"}
    assert all(r.calibration_version == "1" for r in after_apply)
    scored = [r for r in after_apply if r.reason in (Reason.OK, Reason.ANOMALY)]
    assert scored and all(r.threshold == applied for r in scored)
    # Good parts only: a 1 % target must not reject a large share (a threshold at the median would reject half).
    assert sum(r.verdict == Verdict.REJECT for r in scored) <= len(scored) // 4

    code, out, err = cli(capsys, "rollback", *cfg, "--reason", "back to the config thresholds")
    assert code == 0, err
    assert "rollback to v0" in out
    rolled_at = ledger_rows(storage)[-1].seq
    after_rollback = parts_after(storage, rolled_at, 8)
    assert all(r.calibration_version == "0" for r in after_rollback)
    assert all(r.threshold == CONFIG_THRESHOLD for r in after_rollback if r.reason in (Reason.OK, Reason.ANOMALY))
    current = json.loads((storage / "calibration" / "current.json").read_text())
    assert current["version"] == 0 and current["recipes"]["default"]["threshold"] == CONFIG_THRESHOLD

    line.stop()
    wait_for(lambda: not (storage / "control.sock").exists(), 30, "the line to stop")
    rows = ledger_rows(storage)
    # No part missed across both switches: consecutive part ids, one row each, every verdict acknowledged once.
    assert [r.part_id for r in rows] == [f"part{k:06d}" for k in range(1, len(rows) + 1)]
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    wait_for(lambda: all(r.acked for r in ledger_rows(storage)), 10, "every verdict acknowledged")
    assert sorted(v.seq for v in plc.received()) == [r.seq for r in rows]

    code, out, _ = cli(capsys, "audit", "verify", *cfg)
    assert code == 0 and "OK" in out, out
    audit = storage / "calibration" / "audit.jsonl"
    lines = audit.read_text().splitlines()
    # Each live change: the technician's intent, the runtime's own record of what it applied, the result.
    assert [json.loads(x)["action"] for x in lines] == ["baseline", "threshold.apply", "runtime.applied",
                                                       "threshold.apply", "rollback", "runtime.applied", "rollback"]
    edited = json.loads(lines[1])
    edited["reason"] = "someone else's reason"
    lines[1] = json.dumps(edited, sort_keys=True, separators=(",", ":"))
    audit.write_text("\n".join(lines) + "\n")
    code, out, _ = cli(capsys, "audit", "verify", *cfg)
    assert code == 1 and "record 3: chain broken" in out, out


def test_changes_to_a_running_line_need_the_technician_token(running_line, capsys, monkeypatch):
    config_path, storage, _, _ = running_line
    token = storage / "calibration" / "technician.token"
    assert token.stat().st_mode & 0o777 == 0o640
    monkeypatch.setattr(Path, "read_text", _deny(token, Path.read_text))
    code, _, err = cli(capsys, "threshold", "apply", "--yes", "--config", str(config_path), "--threshold", "0.3",
                       "--reason", "should be refused")
    assert code == 2 and "technician role" in err and len(err.strip().splitlines()) == 1
    assert not (storage / "calibration" / "audit.jsonl").exists()
    reply = request(storage / "control.sock", {"cmd": "pool_purge", "all": True, "token": "wrong"})
    assert not reply["ok"] and reply.get("denied")


def _deny(path: Path, original):
    def read_text(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(path))
        return original(self, *args, **kwargs)
    return read_text


def test_pool_changes_dry_run_and_test_fire_are_audited(running_line, capsys):
    config_path, storage, _, plc = running_line
    cfg = ("--config", str(config_path))
    code, out, _ = cli(capsys, "pool", "inspect", *cfg, "--json")
    members = json.loads(out)["members"]
    assert code == 0 and len(members) == 24 and len(json.loads(out)["leave_one_out_scores"]) == 24

    def golden() -> set[str]:
        return {m["part_id"] for m in json.loads(cli(capsys, "pool", "inspect", *cfg, "--json")[1])["members"]
                if m["golden"]}

    assert cli(capsys, "pool", "freeze", *cfg, "--lowest", "5", "--reason", "golden core")[0] == 0
    frozen = golden()
    assert len(frozen) == 5
    code, out, err = cli(capsys, "pool", "purge", *cfg, "--all", "--reason", "suspected contamination")
    assert code == 0 and "pool now 5 members, 5 golden" in out, out + err
    assert golden() == frozen   # golden members are neither purged nor evicted by the parts that follow

    good_folder = Path(yaml.safe_load(config_path.read_text())["source"]["path"]) / "good"
    code, out, err = cli(capsys, "pool", "reseed", *cfg, "--folder", str(good_folder), "--reason", "new lot")
    assert code == 0 and "pool now 24 members" in out, out + err
    assert golden() == frozen

    code, out, err = cli(capsys, "timing", "dry-run", "on", *cfg, "--reason", "PLC in bypass for commissioning")
    assert code == 0 and "NOT sent to the PLC" in out, err
    dry = [r for r in parts_after(storage, ledger_rows(storage)[-1].seq, 4) if r.calibration_version == "1"]
    code, out, err = cli(capsys, "timing", "test-fire", *cfg, "--part-id", "TEST-1", "--reason", "ejector check")
    assert code == 0 and "PLC acknowledged" in out, err
    test_rows = [r for r in ledger_rows(storage) if r.part_id == "TEST-1"]
    assert len(test_rows) == 1 and test_rows[0].reason == Reason.TEST_FIRE and test_rows[0].test_part
    assert not test_rows[0].dry_run and test_rows[0].acked
    assert any(v.part_id == "TEST-1" and v.verdict == "REJECT" for v in plc.received())
    # Dry-run: verdicts recorded, never signalled (the test part above is the exception).
    assert dry and all(r.dry_run for r in dry)
    assert not {r.seq for r in dry} & {v.seq for v in plc.received()}

    records = [json.loads(x) for x in (storage / "calibration" / "audit.jsonl").read_text().splitlines()]
    intents = [r for r in records if r["result_of"] is None]
    assert [r["action"] for r in intents] == ["pool.freeze", "pool.purge", "pool.reseed", "baseline",
                                              "timing.dry-run", "timing.test-fire"]
    assert all(any(x["result_of"] == r["seq"] and "ok" in x["new"] for x in records)
               for r in intents if r["action"] != "baseline")
    code, out, _ = cli(capsys, "status", *cfg)
    assert code == 0 and "RUNNING" in out and "<- threshold" in out


def doc_block(after: str) -> list[str]:
    """The musc-calibrate commands of the first fenced block after the line ``after`` in docs/calibration.md."""
    block = block_after(Path(__file__).resolve().parents[1] / "docs" / "calibration.md", after)
    return [command for command in commands(block) if command.startswith("musc-calibrate")]


class _Terminal(io.StringIO):
    """A technician at a terminal who answers every question with ``y``."""

    def __init__(self):
        super().__init__("y\n" * 10)

    def isatty(self) -> bool:
        return True


def test_the_documented_technician_session_puts_in_force_exactly_what_shadow_tested(running_line, capsys,
                                                                                    monkeypatch):
    config_path, storage, line, _ = running_line
    session = doc_block("A typical session")
    assert [c.split()[1:3] for c in session][:4] == [["status", "--config"], ["threshold", "suggest"],
                                                    ["threshold", "shadow"], ["threshold", "apply"]]
    monkeypatch.setattr(sys, "stdin", _Terminal())
    tested = None
    for command in session:
        argv = shlex.split(command.replace("deploy/replay-zmq.yaml", str(config_path)))[1:]
        if tested is not None:
            argv = [tested["id"] if arg == "CANDIDATE_ID" else arg for arg in argv]
        code, out, err = cli(capsys, *argv)
        assert code == 0, f"{command}: {err}"
        if argv[:2] == ["threshold", "shadow"]:
            ident = re.search(r"candidate (c[0-9a-f]{10}) \(threshold", out).group(1)
            tested = json.loads((storage / "calibration" / "candidates" / f"{ident}.json").read_text())
        if argv[:2] == ["threshold", "apply"]:
            assert "candidate " + tested["id"] in out and "in force" in out
    live = request(storage / "control.sock", {"cmd": "status"})
    assert live["recipes"]["default"]["threshold"] == tested["threshold"]   # exactly, not recomputed
    assert live["calibration_version"] == "1"

    (undo,) = doc_block("To undo it:")
    code, out, err = cli(capsys, *shlex.split(undo.replace("deploy/replay-zmq.yaml", str(config_path)))[1:])
    assert code == 0 and "rollback to v0" in out, err
    assert request(storage / "control.sock", {"cmd": "status"})["recipes"]["default"]["threshold"] == CONFIG_THRESHOLD


def test_apply_refuses_a_candidate_the_line_has_moved_past_and_a_stopped_line_before_printing(running_line,
                                                                                             capsys):
    config_path, storage, line, _ = running_line
    cfg = ("--config", str(config_path))
    code, out, _ = cli(capsys, "threshold", "shadow", *cfg, "--threshold", "0.9", "--json")
    stale = json.loads(out)["candidate"]
    assert cli(capsys, "threshold", "apply", "--yes", *cfg, "--threshold", "0.8", "--reason", "other")[0] == 0
    code, _, err = cli(capsys, "threshold", "apply", "--yes", *cfg, "--candidate", stale, "--reason", "stale")
    assert code == 2 and "tested against calibration v0" in err and "now has v1" in err, err
    code, out, _ = cli(capsys, "threshold", "apply", *cfg, "--threshold", "0.7", "--reason", "no terminal")
    assert code == 2 and "v2" not in out                                   # not confirmed: nothing changed
    line.stop()
    wait_for(lambda: not (storage / "control.sock").exists(), 30, "the line to stop")
    code, out, err = cli(capsys, "threshold", "apply", "--yes", *cfg, "--threshold", "0.7", "--reason", "stopped")
    assert code == 2 and out == "" and "no running line answers" in err
    code, out, _ = cli(capsys, "versions", *cfg, "--json", "--storage", str(storage))
    assert code == 2 and json.loads(out)["ok"] is False                    # --json errors are JSON


def test_row_11_read_only_requests_never_run_on_the_scoring_thread_and_a_flood_costs_one_computation(
        running_line, monkeypatch):
    import socket as sockets

    from musc_edge.edge.runtime import control_handlers
    from musc_edge.edge.runtime.control import MAX_PENDING

    _, storage, line, _ = running_line
    computed_on = []
    original = control_handlers.leave_one_out_scores

    def recording(*args, **kwargs):
        computed_on.append(threading.current_thread().name)
        return original(*args, **kwargs)
    monkeypatch.setattr(control_handlers, "leave_one_out_scores", recording)
    replies = []

    def operator() -> None:
        for _ in range(3):
            replies.append(request(storage / "control.sock", {"cmd": "pool_scores", "recipe": "default"}))
    started = time.monotonic()
    operators = [threading.Thread(target=operator) for _ in range(6)]
    for t in operators:
        t.start()
    for t in operators:
        t.join(60)
    elapsed = time.monotonic() - started
    assert len(replies) == 18 and all(r["ok"] and len(r["scores"]) == 24 for r in replies), replies[:1]
    assert computed_on and "worker" not in computed_on
    assert len(computed_on) <= 1 + int(elapsed // control_handlers.LOO_REUSE_S)   # the rest reuse the result

    idle = []   # more idle connections than the server keeps: the oldest are closed, status still answers
    try:
        for _ in range(MAX_PENDING + 50):
            conn = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
            conn.connect(str(storage / "control.sock"))
            idle.append(conn)
        assert request(storage / "control.sock", {"cmd": "status"}, timeout=10)["ok"]
    finally:
        for conn in idle:
            conn.close()
    assert line.stats.parts > 0 and not any("control" in alarm for alarm in line.stats.alarms)


def test_a_request_waits_while_the_control_sockets_accept_queue_is_full_then_says_so(tmp_path):
    """A socket with a timeout gets EAGAIN, not a wait, from a full AF_UNIX accept queue: the client retries until
    its timeout and then raises ReplyLost (a ControlError the CLI prints as one line), never BlockingIOError."""
    import socket

    from musc_edge.edge.runtime.control import ReplyLost

    path = tmp_path / "c.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)              # never accepts: the queue fills with the clients below
    waiting = []
    try:
        for _ in range(8):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:   # the queue is full: what `request` meets
                client.close()
                break
            waiting.append(client)
        else:
            pytest.skip("this kernel never reported a full AF_UNIX accept queue")
        started = time.monotonic()
        with pytest.raises(ReplyLost, match="accepted no connection"):
            request(path, {"cmd": "status"}, timeout=0.5)
        assert time.monotonic() - started >= 0.5   # it waited for the queue, to its timeout
    finally:
        for client in waiting:
            client.close()
        server.close()
