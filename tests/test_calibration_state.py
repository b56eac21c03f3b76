"""Calibration state that no kill, deletion or forgery can brick or bend (issue 21 rows 7, 8, 13, 14, 20 and
item 4): the process is killed after every durable write of an apply, a rollback, a staged change, a pool
change and of start-up recovery itself; each time the line starts again, on a version the audit log explains."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from musc_edge.calibration.render import audit_record
from musc_edge.edge.runtime import calibration_state as cs
from musc_edge.edge.runtime.calibration_state import (AuditLog, Calibration, CalibrationAuthority, CalibrationError,
                                                       CalibrationStore, audited_in_force, read_audit_key)

RECIPES = {"default"}


def calibration(version: int, threshold: float, **extra) -> Calibration:
    return Calibration(version=version, recipes={"default": {"threshold": threshold}}, **extra)


def start(storage: Path) -> tuple[CalibrationAuthority, cs.Authorised]:
    """What the runtime does at start: its authority, and the calibration it runs."""
    authority = CalibrationAuthority(storage, RECIPES, "runtime:test")
    return authority, authority.at_start("test")


def commit_live(storage: Path, new: Calibration, *, create: bool = True, action: str = "threshold.apply") -> dict:
    """A technician's live change with the running line in the same process (its authority puts it in force)."""
    runtime, in_force = start(storage)
    store = CalibrationStore(storage, read_audit_key(storage))
    with store.lock():
        return store.commit(new, who="tech@test", action=action, reason="test", old=None, create=create,
                            apply_live=lambda payload: (runtime.put_in_force(Calibration(**payload), in_force, "t"),
                                                        {"version": payload["version"]})[1])


def commit_staged(storage: Path, new: Calibration) -> dict:
    store = CalibrationStore(storage, read_audit_key(storage))
    with store.lock():
        return store.commit(new, who="tech@test", action="threshold.apply", reason="staged", old=None,
                            apply_live=None, create=True)


def pool_change(storage: Path) -> None:
    store = CalibrationStore(storage, read_audit_key(storage))
    with store.lock():
        store.audit.record_change(who="tech@test", action="pool.reseed", target="pool default", old={"size": 5},
                                  new={"folder": "/captures"}, reason="new lot", perform=lambda: {"size": 9})


@pytest.fixture
def line_at_v1(tmp_path) -> Path:
    """A line's storage: config baseline v0 and v1 (threshold 0.5) applied live."""
    storage = tmp_path / "line"
    start(storage)
    store = CalibrationStore(storage, read_audit_key(storage))
    with store.lock():
        store.record_baseline(calibration(0, 1.0), who="tech@test")
    commit_live(storage, calibration(1, 0.5))
    return storage


def fsyncs_of(step, storage: Path) -> int:
    """How many durable writes (fsync calls) ``step`` makes on a copy of ``storage``."""
    copy = storage.parent / "count"
    shutil.copytree(storage, copy)
    calls = [0]
    real = os.fsync

    def counting(fd):
        calls[0] += 1
        real(fd)
    cs.os.fsync = counting
    try:
        step(copy)
    finally:
        cs.os.fsync = real
    shutil.rmtree(copy)
    return calls[0]


def _die_after_writes(step, storage: Path, n: int) -> None:
    """The child of :func:`killed_after_write`: no cleanup, no atexit, no flushing of anything but what was
    fsynced."""
    calls = [0]
    real = os.fsync

    def dying(fd):
        real(fd)
        calls[0] += 1
        if calls[0] == n:
            os._exit(137)
    cs.os.fsync = dying
    try:
        step(storage)
    except BaseException:
        os._exit(3)
    os._exit(0)


def killed_after_write(step, storage: Path, n: int) -> int:
    """Run ``step`` in a child process that dies (os._exit, like kill -9) right after its ``n``-th durable
    write; returns the child's exit status (137: killed there, 0: it finished first).

    The child comes from a fork server, not from os.fork() of this process: the test process has threads of
    earlier tests, and a fork taken while one of them holds a lock (an allocator's, a logging handler's)
    leaves the child waiting on it forever."""
    child = multiprocessing.get_context("forkserver").Process(target=_die_after_writes, args=(step, storage, n))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        child.join()
        raise AssertionError(f"the step did not finish or die within 120 s (write {n})")
    return child.exitcode


def assert_starts_on_an_explained_version(storage: Path, allowed: set[int]) -> int:
    """Start the line (twice: recovery must itself be repeatable); the audit verifies with the secret, every
    version file is accounted for, and the version it runs is the one the audit says is in force."""
    for _ in range(2):
        authority, in_force = start(storage)
    store = authority.store
    check = store.audit.verify()
    assert check.ok and not check.pending and check.keyed, check
    assert store.check_versions(store.audit.records()) == []
    running = 0 if in_force.calibration is None else in_force.calibration.version
    audited = audited_in_force(store.audit.records())
    assert running == (0 if audited is None else audited[0])
    assert running in allowed, running
    return running


def apply_v2(storage: Path) -> None:
    commit_live(storage, calibration(2, 0.7))


def roll_back_to_v0(storage: Path) -> None:
    commit_live(storage, CalibrationStore(storage).load_version(0), create=False, action="rollback")


def stage_v2(storage: Path) -> None:
    commit_staged(storage, calibration(2, 0.7))


# Module-level steps: the fork server's child finds them by name.
SCENARIOS = {
    "apply": (apply_v2, {1, 2}),
    "rollback": (roll_back_to_v0, {0, 1}),
    "staged apply": (stage_v2, {1, 2}),
    "pool reseed": (pool_change, {1}),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_kill_after_any_write_leaves_a_line_that_starts_on_an_explained_version(line_at_v1, scenario):
    step, allowed = SCENARIOS[scenario]
    writes = fsyncs_of(step, line_at_v1)
    assert writes >= 3
    seen = set()
    for n in range(1, writes + 1):
        storage = line_at_v1.parent / f"{scenario.replace(' ', '_')}_{n}"
        shutil.copytree(line_at_v1, storage)
        assert killed_after_write(step, storage, n) == 137
        seen.add(assert_starts_on_an_explained_version(storage, allowed))
        commit_live(storage, calibration(50, 0.9))   # and the line still takes changes afterwards
        assert start(storage)[1].calibration.version == 50
    assert seen == allowed   # both outcomes occur: before the point of no return, and after it


def test_a_kill_inside_start_up_recovery_is_recovered_at_the_next_start(line_at_v1):
    # A line killed between the audit append and the head of its runtime.applied record (row 7), then
    # current.json deleted (row 13): the start that recovers both is itself killed after each of its writes.
    storage = line_at_v1.parent / "broken"
    shutil.copytree(line_at_v1, storage)
    assert killed_after_write(apply_v2, storage, 5) == 137
    (storage / "calibration" / "current.json").unlink(missing_ok=True)
    writes = fsyncs_of(start, storage)
    assert writes >= 2
    for n in range(1, writes + 1):
        copy = storage.parent / f"recovering_{n}"
        shutil.copytree(storage, copy)
        assert killed_after_write(start, copy, n) == 137
        assert_starts_on_an_explained_version(copy, {1, 2})


def test_row_7_a_head_one_record_behind_is_completed_not_called_tampering(line_at_v1):
    log = AuditLog(line_at_v1 / "calibration", read_audit_key(line_at_v1))
    head = log.head_path.read_bytes()
    log.append(who="x", action="pool.purge", target="pool default", old=None, new={}, reason="r")
    log.head_path.write_bytes(head)                       # what a kill between the two writes leaves
    check = log.verify()
    assert check.ok and check.pending == ["head"]
    assert AuditLog(log.dir).verify().ok                   # an operator's check without the secret agrees
    assert log.repair() == ["head"] and log.verify().pending == []
    with open(log.path, "ab") as handle:                  # a torn last line (power cut inside the append)
        handle.write(b'{"seq": 99, "act')
    assert log.verify().pending == ["torn"] and log.repair() == ["torn"] and log.verify().ok
    log.path.write_bytes(b"".join(log.path.read_bytes().splitlines(keepends=True)[:-2]))   # two records gone
    assert not log.verify().ok                             # removing records is still tampering


def test_row_13_a_deleted_current_json_is_restored_from_the_audit_never_a_silent_v0(line_at_v1):
    current = line_at_v1 / "calibration" / "current.json"
    current.unlink()
    assert any("current.json is missing" in p for p in CalibrationStore(line_at_v1).check_versions(
        CalibrationStore(line_at_v1).audit.records()))
    _, in_force = start(line_at_v1)
    assert in_force.calibration.version == 1 and json.loads(current.read_text())["version"] == 1
    assert CalibrationStore(line_at_v1).audit.records()[-1]["action"] == "recovery"
    current.unlink()
    (line_at_v1 / "calibration" / "v0001.json").write_text("{}")   # and the version it names is gone too
    with pytest.raises(CalibrationError, match="current.json is missing"):
        start(line_at_v1)


def test_row_14_a_chain_rebuilt_without_the_device_secret_is_refused(line_at_v1):
    folder = line_at_v1 / "calibration"
    assert (line_at_v1 / "audit.key").stat().st_mode & 0o777 == 0o600
    records = AuditLog(folder).records()
    # The attacker can write calibration/ but not read the secret: the whole chain and head rebuilt with
    # the library under a key of their own, a v50 with threshold 999999 at its end.
    (folder / "audit.jsonl").unlink()
    (folder / "audit.head").unlink()
    forged = CalibrationStore(line_at_v1, key=b"attacker" * 4)
    for record in records:
        forged.audit.append(**{k: record[k] for k in ("who", "action", "target", "old", "new", "reason",
                                                      "result_of")})
    new = calibration(50, 999999.0)
    sha = forged.save_version(new)
    forged.audit.append(who="technician@plant", action="threshold.apply", target="calibration v0050", old=None,
                        new={**new.model_dump(mode="json"), "file_sha256": sha}, reason="weekly recalibration")
    forged.write_current(new)
    with pytest.raises(CalibrationError, match="no valid MAC"):
        start(line_at_v1)
    assert AuditLog(folder).verify().ok          # the unkeyed chain is intact: only the secret tells it apart


def test_an_older_unkeyed_chain_is_adopted_once_when_the_secret_is_created(line_at_v1):
    folder = line_at_v1 / "calibration"
    records = AuditLog(folder).records()
    (line_at_v1 / "audit.key").unlink()                   # a line from before the audit was keyed:
    (folder / "audit.jsonl").unlink()                     # the same records, no MACs
    (folder / "audit.head").unlink()
    legacy = AuditLog(folder)
    for record in records:
        body = {k: record[k] for k in ("who", "action", "target", "old", "new", "reason", "result_of")}
        check = legacy._verify(macs=False)
        line = cs._canonical({"seq": check.records + 1, "time": record["time"], **body,
                              "prev_sha256": check.head_sha256})
        with open(legacy.path, "ab") as handle:
            handle.write(line + b"\n")
        legacy.head_path.write_bytes(cs._canonical({"records": check.records + 1, "sha256": cs._sha256(line)}))
    authority, in_force = start(line_at_v1)
    assert in_force.calibration.version == 1
    keyed = authority.store.audit
    assert [r["action"] for r in keyed.records()].count(cs.KEYED) == 1 and keyed.verify().ok
    start(line_at_v1)
    assert [r["action"] for r in keyed.records()].count(cs.KEYED) == 1


def test_row_20_the_audit_log_shows_the_runtimes_records_as_what_it_put_in_force(line_at_v1):
    shown = [audit_record(r) for r in AuditLog(line_at_v1 / "calibration").records()]
    assert not any("FAILED" in line for line in shown), shown
    assert any("in force on the line: v1 (default 0.5000), authorised by #" in line for line in shown), shown


@pytest.mark.parametrize("delay", [float("inf"), float("nan"), 1e13, -5.0, 0.0])
def test_row_10_a_reject_timing_the_line_cannot_wait_for_is_refused(delay):
    with pytest.raises(ValueError):
        Calibration(version=1, reject_timing={"mode": "time", "delay_ms": delay})
    assert Calibration(version=1, reject_timing={"mode": "time", "delay_ms": 250.0}).reject_timing.delay_ms == 250


# -- row 12: offline seeding is a technician's audited change ---------------------------------------------------
def test_row_12_offline_pool_seed_needs_the_role_and_a_reason_and_is_audited(toy_model, tmp_path, capsys,
                                                                              monkeypatch):
    import yaml

    from musc_edge.edge.cli import main as edge_main
    from musc_edge.edge.runtime.control import ControlServer, token_path
    from musc_edge.edge.runtime.storage_lock import StorageLock
    from musc_edge.edge.synthetic import generate_set
    from tests.test_calibration_e2e import line_config

    parts = generate_set(tmp_path / "parts", n=12, defect_fraction=0.0, seed=3, size=128) / "test"
    storage = tmp_path / "line"
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump(line_config(toy_model, parts, storage, "tcp://127.0.0.1:1")))
    seed = ["pool", "seed", "--config", str(config), "--folder", str(parts / "good")]
    with pytest.raises(SystemExit) as exited:
        edge_main(seed)                                                # no --reason
    assert exited.value.code == 2

    token = token_path(storage)
    token.parent.mkdir(parents=True)
    token.write_text("f" * 32 + "\n")
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if self == token else real_read(self, *a, **k))
    assert edge_main([*seed, "--reason", "warm start"]) == 2           # an operator: not a technician
    assert "technician role" in capsys.readouterr().err
    assert not (storage / "calibration" / "audit.jsonl").exists() and not (storage / "pools").exists()
    monkeypatch.undo()

    starting = StorageLock.acquire(storage)            # a line that is starting: no control socket yet
    try:
        assert edge_main([*seed, "--reason", "warm start"]) == 2
        assert f"the line is running (pid {os.getpid()}, since " in capsys.readouterr().err
        assert not (storage / "calibration" / "audit.jsonl").exists() and not (storage / "pools").exists()
    finally:
        starting.release()
    server = ControlServer(storage / "control.sock", "t" * 32, lambda request: {})   # a running line
    try:
        assert edge_main([*seed, "--reason", "warm start"]) == 2
        assert "musc-calibrate pool reseed" in capsys.readouterr().err
    finally:
        server.close()

    assert edge_main([*seed, "--reason", "warm start"]) == 0
    assert "recorded in the audit log" in capsys.readouterr().out
    log = AuditLog(storage / "calibration", read_audit_key(storage))
    intent, result = log.records()
    assert (intent["action"], intent["reason"], intent["new"]["folder"]) == ("pool.seed", "warm start",
                                                                              str((parts / "good").resolve()))
    assert result["result_of"] == intent["seq"] and result["new"]["ok"]["size"] > 0
    assert log.verify().ok and (storage / "audit.key").stat().st_mode & 0o777 == 0o600


def test_a_deleted_audit_log_is_not_mistaken_for_an_interrupted_change(line_at_v1):
    folder = line_at_v1 / "calibration"
    (folder / "audit.jsonl").unlink()
    (folder / "audit.head").unlink()
    with pytest.raises(CalibrationError, match="created by no audit record"):
        start(line_at_v1)
    assert CalibrationStore(line_at_v1).versions() == [0, 1]     # nothing was removed
