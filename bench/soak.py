"""Soak benchmark (issues #8 and #21; `make soak`, not CI): the runtime under hostile input and repeated kill -9,
some of them inside a calibration apply or a pool save.

A ZeroMQ "camera" pushes ``--parts`` synthetic parts at ``--rate`` parts/s into ``musc-edge run`` (the toy
feature model, a real subprocess), ``--hostile`` of them hostile, drawn from the catalogue in tests/hostile.py
(a 65-byte part id, an encoder beyond int64, PNG and stray-byte JPEG bombs, a truncated PNG, a NaN capture
time, shapes whose product wraps int64, 100,000-deep and 200 kB JSON headers, cloud dtype and float-shape
tricks); each one names the NO_VERDICT row the line must give it. About every ``--kill-every`` parts
(+- 50 %) the runtime gets SIGKILL, the moment chosen in turn from ``--kill-modes``:

* ``apply``: ``musc-calibrate threshold apply`` runs (through the control socket) and the runtime is killed
  inside it: once the intent record is in the audit log, once ``current.json`` changed, or once the runtime
  wrote its ``runtime.applied`` record (drawn at random);
* ``persist``: the runtime is killed while its pool writer writes (a ``pools/*.tmp`` file exists);
* ``random``: at a random moment with parts in flight.

A window not seen within its time limit is killed anyway and counted as missed. The runtime is then started
again (a refused start is a failed restart) and must come up on the calibration version the audit log says is
in force (the chain verified with the device secret). The PLC simulator lives in this process, so it sees
every restart's re-sends. A frame the runtime had received but not yet recorded when it was killed is lost
with it (nothing was signalled for it: the PLC's inspect window rejects that part); the camera re-sends such
frames after the restart, as a frame grabber with a retry would (``resent_after_kill``).

Prints (and with ``--json`` writes) a JSON summary: parts, rows, acknowledged, duplicates the PLC absorbed,
NO_VERDICT by reason and by explanation (a hostile message of the kind that gives that reason, or a warm-up
before the pool is ready), the unexplained ones, kills by mode and window, restarts, failed restarts, whether
each restart ran an audited version, and the longest downtime. Exit 0 when the bar holds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import yaml
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from musc_edge.edge.ledger import Ledger  # noqa: E402
from musc_edge.edge.plc_sim import PlcSimulator  # noqa: E402
from musc_edge.edge.record import Reason, Verdict  # noqa: E402
from musc_edge.edge.runtime.calibration_state import (AuditError, AuditLog, audited_in_force,  # noqa: E402
                                                      calibration_dir, read_audit_key)
from musc_edge.edge.sources.zmq_source import send_frame  # noqa: E402
from tests.hostile import HOSTILE_KINDS, UNREADABLE_DETAIL, hostile_message  # noqa: E402
from tests.toymodel import build_toy_model  # noqa: E402

KILL_MODES = ("apply", "persist", "random")
APPLY_WINDOWS = ("intent", "current", "applied")
UNREADABLE = "~unreadable-"     # key prefix of a message whose header the line cannot read (its row: a counter id)
POLL_S = 0.0002                 # how often a kill watcher looks for its moment
MIN_SIZE = 8                    # the soak line's pool min_size


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def part_images(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct small PNGs: a smooth part with noise; every 10th has a dark blob (a defect)."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(90, 160, (96, 96, 3), dtype=np.uint8), (0, 0), 6)
    out = []
    for k in range(n):
        image = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
        if k % 10 == 9:
            cv2.circle(image, tuple(int(v) for v in rng.integers(20, 76, 2)), 8, (20, 20, 20), -1)
        out.append(cv2.imencode(".png", image)[1].tobytes())
    return out


class Camera:
    """A PUSH socket to the runtime's source; replaced at each restart (queued frames die with the old one)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint, self.socket = endpoint, None
        self.connect()

    def connect(self) -> None:
        self.close()
        self.socket = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, 1000)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.endpoint)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    def send(self, image: bytes, part_id: str, kind: str | None, k: int) -> None:
        """Push one part: an ordinary one, or the hostile message of ``kind`` (tests/hostile.py)."""
        if kind is None:
            send_frame(self.socket, image, part_id=part_id, encoder=k * 100)
        else:
            self.socket.send_multipart(hostile_message(kind, image, part_id).frames)


class Runtime:
    """``musc-edge run`` as a subprocess; restarts are timed from the kill to a ready control socket."""

    def __init__(self, config: Path, storage: Path, log: Path) -> None:
        self.config, self.storage, self.log = config, storage, log
        self.proc: subprocess.Popen | None = None
        self.restarts = self.failed_restarts = 0
        self.failures: list[str] = []
        self.downtimes: list[float] = []

    def start(self, timeout: float = 120) -> None:
        """Start it and wait for its control socket; RuntimeError (naming the log's last line) when it exits."""
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "musc_edge.edge.cli", "run", "--config", str(self.config)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"runtime exited {self.proc.returncode} at start: {last_line(self.log)}")
            if time.monotonic() - t0 > timeout:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"runtime not ready after {timeout} s; see {self.log}")
            time.sleep(0.05)

    def status(self) -> dict:
        from musc_edge.edge.runtime.control import request
        return request(self.storage / "control.sock", {"cmd": "status"}, timeout=10)

    def _ready(self) -> bool:
        from musc_edge.edge.runtime.control import ControlError
        try:
            return bool(self.status().get("ok"))
        except (ControlError, OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def restart(self, killed_at: float, tries: int = 3) -> bool:
        """Start again after a kill (or an exit); each refused start counts as a failed restart."""
        self.proc.wait()
        for _ in range(tries):
            try:
                self.start()
            except RuntimeError as exc:
                self.failed_restarts += 1
                self.failures.append(str(exc)[:300])
                continue
            self.restarts += 1
            self.downtimes.append(time.monotonic() - killed_at)
            return True
        return False

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class KillWatcher(threading.Thread):
    """Kills the runtime at one dangerous moment (see the module docstring), or after ``limit_s`` anyway."""

    def __init__(self, mode: str, runtime: Runtime, config: Path, rng: random.Random, threshold: float,
                 limit_s: float) -> None:
        super().__init__(daemon=True)
        self.mode, self.runtime, self.config, self.limit_s = mode, runtime, config, limit_s
        self.window = rng.choice(APPLY_WINDOWS) if mode == "apply" else mode
        self.delay = rng.uniform(0, 0.5)
        self.threshold = threshold
        self.cal = calibration_dir(runtime.storage)
        self.fired, self.cancelled = threading.Event(), threading.Event()
        self.hit, self.killed_at, self.client, self.client_rc, self.client_said = False, 0.0, None, None, ""
        self.audit_head_behind = False
        self.start_version = running_version(runtime)

    def run(self) -> None:
        try:
            if self.mode == "apply":
                self._arm_apply()
            moment = {"apply": self._apply_moment, "persist": self._persist_moment,
                      "random": lambda: True}[self.mode]
            end = time.monotonic() + (self.limit_s if self.mode != "random" else self.delay)
            while not self.cancelled.is_set() and time.monotonic() < end:
                if self.mode != "random" and moment():
                    self.hit = True
                    break
                if self.client is not None and self.client.poll() is not None:
                    self.hit = moment()           # the apply ended (or failed) before the moment: killed now
                    break
                time.sleep(POLL_S if self.mode != "random" else 0.01)
            self.hit = self.hit or self.mode == "random"
            if self.cancelled.is_set():
                return
            self.runtime.kill()
            self.killed_at = time.monotonic()
            self.fired.set()
        finally:
            self._wait_client()

    # -- apply: musc-calibrate in the background, the runtime killed at one step of it
    def _arm_apply(self) -> None:
        audit = self.cal / "audit.jsonl"
        self.audit_offset = audit.stat().st_size if audit.is_file() else 0
        self.current_stat = _stat(self.cal / "current.json")
        self.client = subprocess.Popen(
            [sys.executable, "-m", "musc_edge.calibration.cli", "threshold", "apply", "--threshold",
             f"{self.threshold:g}", "--reason", "soak: a kill inside the apply", "--yes", "--config",
             str(self.config)], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)

    def _apply_moment(self) -> bool:
        if self.window == "current":
            return _stat(self.cal / "current.json") != self.current_stat
        try:
            with open(self.cal / "audit.jsonl", "rb") as audit:
                audit.seek(self.audit_offset)
                new = audit.read()
        except OSError:
            return False
        records = [json.loads(line) for line in new.splitlines(keepends=True) if line.endswith(b"\n")]
        if self.window == "intent":
            return any(r.get("action") == "threshold.apply" and r.get("result_of") is None for r in records)
        return any(r.get("action") == "runtime.applied" for r in records)

    def _wait_client(self) -> None:
        if self.client is None:
            return
        try:
            out, _ = self.client.communicate(timeout=120)
        except subprocess.TimeoutExpired:   # a client that hangs on a dead line is a finding: killed, reported
            self.client.kill()
            out, _ = self.client.communicate()
            out += "\n(soak: musc-calibrate hung for 120 s and was killed)"
        self.client_rc = self.client.returncode
        self.client_said = (out.strip().splitlines() or [""])[-1][:200]

    # -- persist: a temp file of the pool writer exists
    def _persist_moment(self) -> bool:
        try:
            return any(name.endswith(".tmp") for name in os.listdir(self.runtime.storage / "pools"))
        except OSError:
            return False

    def outcome(self) -> dict:
        log = self.cal / "audit.jsonl"
        try:
            head = json.loads((self.cal / "audit.head").read_text()).get("records")
            lines = len(log.read_bytes().splitlines())
            self.audit_head_behind = head is not None and head < lines
        except (OSError, ValueError):
            pass
        out = {"mode": self.mode, "window": self.window, "hit": self.hit, "version_before": self.start_version}
        if self.mode == "apply":
            out.update(threshold=self.threshold, client_rc=self.client_rc, client_said=self.client_said,
                       audit_head_behind_at_kill=self.audit_head_behind)
        return out


def _stat(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def running_version(runtime: Runtime) -> str | None:
    try:
        return runtime.status().get("calibration_version")
    except Exception:   # noqa: BLE001 - a line that does not answer has no version to report
        return None


def audited_check(storage: Path, running: str | None) -> dict:
    """Whether the version the line runs is the one its audit log (verified with the device secret) puts in
    force: the newest applied or staged version, or the config's thresholds ("0") when none ever was."""
    log = AuditLog(calibration_dir(storage), read_audit_key(storage))
    try:
        check = log.verify()
        audited = audited_in_force(log.records()) if check.ok else None
        problems = check.problems
    except (AuditError, OSError, ValueError) as exc:
        audited, problems = None, [str(exc)]
    expected = str(audited[0]) if audited is not None else "0"
    return {"running": running, "audited": expected, "audit_ok": not problems, "problems": problems[:2],
            "explained": not problems and running == expected}


def ledger_rows(storage: Path) -> list:
    if not (storage / "ledger.sqlite").is_file():
        return []
    with Ledger.open_readonly(storage / "ledger.sqlite") as reader:
        return list(reader.iter_rows())


def row_keys(rows: list) -> list[str]:
    """Each row's key: its part id, or for a message whose header was unreadable (the line named it from its
    own counter, which starts again at each restart) the n-th such row, in the order the line recorded them."""
    keys, unreadable = [], 0
    for row in rows:
        if row.detail.startswith(UNREADABLE_DETAIL):
            keys.append(f"{UNREADABLE}{unreadable}")
            unreadable += 1
        else:
            keys.append(row.part_id)
    return keys


def settle(storage: Path, quiet_s: float = 1.5, timeout: float = 60) -> int:
    """Wait until the ledger stops growing for ``quiet_s``; returns its row count."""
    last, since, end = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        now = len(ledger_rows(storage))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return last


def explain(rows: list, keys: list[str], expected: dict[str, str | None], segments: list[tuple[int, int]]) -> list:
    """(row, explanation or None) for every NO_VERDICT row. Explained: a hostile message whose kind gives that
    reason, or a warm-up before the first scored part of a run that started with a pool below min_size
    (``segments``: (first row index, pool size at that start) of each run of the runtime)."""
    reasons = {kind: hostile_message(kind, b"\x89PNG", "X").reason for kind in HOSTILE_KINDS}
    warm_until: list[tuple[int, int]] = []
    for n, (first, pool) in enumerate(segments):
        last = segments[n + 1][0] if n + 1 < len(segments) else len(rows)
        if pool < MIN_SIZE:
            scored = next((i for i in range(first, last) if rows[i].reason in (Reason.OK, Reason.ANOMALY)), last)
            warm_until.append((first, scored))
    out = []
    for i, (row, key) in enumerate(zip(rows, keys)):
        if row.verdict != Verdict.NO_VERDICT:
            continue
        kind = expected.get(key)
        if kind is not None and row.reason == reasons[kind]:
            out.append((row, f"hostile:{kind}"))
        elif row.reason == Reason.WARMUP and any(a <= i < b for a, b in warm_until):
            out.append((row, "warmup"))
        else:
            out.append((row, None))
    return out


def soak(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="musc-soak-"))
    shutil.rmtree(work / "line", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    model = build_toy_model(work / "toy.onnx")
    images = part_images(200, seed=args.seed)
    rng = random.Random(args.seed)
    modes = [m for m in args.kill_modes.split(",") if m]
    if not modes or set(modes) - set(KILL_MODES):
        raise SystemExit(f"--kill-modes: a comma-separated list of {', '.join(KILL_MODES)}")
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        storage = work / "line"
        config = work / "line.yaml"
        config.write_text(yaml.safe_dump({
            "line": {"name": "soak", "deadline_ms": args.deadline_ms, "queue_size": 16},
            "model": {"path": str(model), "size": 112, "blocks": [6, 9]},
            "recipes": {"default": {"threshold": 1.2, "pool": {"capacity": 24, "min_size": MIN_SIZE,
                                                               "persist_every_s": 2.0}}},
            "source": {"type": "zmq", "endpoint": endpoint, "recipe": "default"},
            "link": {"type": "zmq", "endpoint": plc.address, "heartbeat_interval_s": 0.5},
            "storage": {"dir": str(storage), "archive": {"enabled": False}},
        }))
        runtime = Runtime(config, storage, work / "runtime.log")
        runtime.start()
        camera = Camera(endpoint)
        expected: dict[str, str | None] = {}   # row key -> hostile kind (None: an ordinary part)
        sent: dict[str, tuple[str | None, int, str]] = {}   # not yet known recorded: key -> (kind, k, part id)
        segments = [(0, 0)]                     # (first row index, pool size) of each run of the runtime
        kills, restart_checks, crashes = [], [], []
        resent = unreadable_sent = 0
        watcher: KillWatcher | None = None
        aborted = None
        next_kill = int(args.kill_every * rng.uniform(0.5, 1.5))
        t0 = t_start = time.monotonic()
        period = 1.0 / args.rate
        k = 0
        while k < args.parts:
            due = t_start + k * period
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            kind = rng.choice(HOSTILE_KINDS) if rng.random() < args.hostile else None
            part_id = f"S{k:06d}"
            if kind is not None and hostile_message(kind, b"", part_id).row_id is None:
                key, unreadable_sent = f"{UNREADABLE}{unreadable_sent}", unreadable_sent + 1
            elif kind is not None:
                key = hostile_message(kind, b"", part_id).row_id
            else:
                key = part_id
            camera.send(images[k % len(images)], part_id, kind, k)
            expected[key] = kind
            sent[key] = (kind, k, part_id)
            k += 1
            if watcher is None and k >= next_kill and args.parts - k >= 30:
                mode = modes[len(kills) % len(modes)]
                watcher = KillWatcher(mode, runtime, config, rng, threshold=1.15 if len(kills) % 2 else 1.25,
                                      limit_s=60 if mode == "apply" else 15)
                watcher.start()
            planned = watcher is not None and watcher.fired.is_set()
            crashed = not planned and runtime.proc.poll() is not None
            if not (planned or crashed):
                if k % 100 == 0:
                    sent = {key: v for key, v in sent.items() if v[1] > k - 400}   # long recorded: forget
                continue
            # -- the runtime is down: restart it, check what it came up on, re-send what it lost
            killed_at = watcher.killed_at if planned else time.monotonic()
            if planned:
                watcher.join()
            else:
                crashes.append({"part": k, "exit_code": runtime.proc.returncode, "log": last_line(runtime.log)})
                if watcher is not None:            # armed for the process that is gone: not for the next one
                    watcher.cancelled.set()
                    watcher.join()
                    watcher = None
            camera.close()
            if not runtime.restart(killed_at):
                aborted = f"the runtime could not be started again after part {k}: {runtime.failures[-1]}"
                break
            try:
                status = runtime.status()
            except Exception as exc:  # noqa: BLE001 - ready a moment ago: reported with the restart's checks
                status = {"stats": {"alarms": [f"soak: no status after the restart ({exc})"]}}
            check = audited_check(storage, status.get("calibration_version"))
            pool = int(status.get("recipes", {}).get("default", {}).get("pool", {}).get("size", 0))
            if planned:
                kills.append({"part": k, **watcher.outcome(), "version_after": check["running"]})
                watcher = None
            restart_checks.append({**check, "pool_size": pool,
                                   "alarms": [a[:160] for a in status.get("stats", {}).get("alarms", [])]})
            rows = settle(storage)                  # the restarted runtime re-sends unacked rows
            segments.append((rows, pool))
            camera.connect()
            time.sleep(0.3)                         # let the PUSH socket connect
            have = set(row_keys(ledger_rows(storage)))
            for key in [key for key in sent if key not in have]:
                kind, j, part_id = sent[key]
                camera.send(images[j % len(images)], part_id, kind, j)
                resent += 1
                time.sleep(period)
            sent.clear()
            next_kill = k + int(args.kill_every * rng.uniform(0.5, 1.5))
            t_start = time.monotonic() - k * period
            print(f"soak: {k}/{args.parts} parts, restart {runtime.restarts} "
                  f"({runtime.downtimes[-1]:.1f} s down, {kills[-1]['mode'] + '/' + kills[-1]['window'] if planned else 'crash'}"
                  f", v{check['running']} {'audited' if check['explained'] else 'NOT EXPLAINED'}), "
                  f"{resent} re-sent so far", flush=True)
        cancelled = None
        if watcher is not None:                    # too close to the end: no kill
            watcher.cancelled.set()
            watcher.join()
            cancelled = watcher.outcome()
        settle(storage)
        camera.close()
        exit_code = runtime.stop() if aborted is None else None
        wall = time.monotonic() - t0
        rows = ledger_rows(storage)
        plc.wait_for(lambda c: c.received >= len(rows), 10)
        counters = plc.counters()
    verify = subprocess.run([sys.executable, "-m", "musc_edge.calibration.cli", "audit", "verify", "--config",
                             str(config)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    keys = row_keys(rows)
    ids = Counter(keys)
    explained = explain(rows, keys, expected, segments)
    unexplained = [row for row, why in explained if why is None]
    acked = sum(r.acked for r in rows)
    report = {
        "parts": args.parts if aborted is None else k, "rate": args.rate,
        "hostile": sum(v is not None for v in expected.values()),
        "hostile_by_kind": dict(Counter(v for v in expected.values() if v is not None)),
        "rows": len(rows), "distinct_row_keys": len(ids), "missing_parts": len(set(expected) - set(ids)),
        "extra_rows": len(set(ids) - set(expected)), "duplicate_rows": sum(n - 1 for n in ids.values()),
        "acked_rows": acked, "plc_logged_once": counters.received,
        "plc_duplicates_absorbed": counters.duplicates, "plc_out_of_order": counters.out_of_order,
        "no_verdict_by_reason": dict(Counter(r.reason.label for r, _ in explained)),
        "no_verdict_by_explanation": dict(Counter(why or "UNEXPLAINED" for _, why in explained)),
        "unexplained_no_verdict": len(unexplained),
        "kills": len(kills), "kills_by_mode": dict(Counter(f"{x['mode']}/{x['window']}" for x in kills)),
        "kill_windows_missed": sum(not x["hit"] for x in kills),
        "apply_kills_new_version_in_force": sum(x["mode"] == "apply" and x["version_after"] != x["version_before"]
                                                for x in kills),
        "crashes": crashes, "restarts": runtime.restarts, "failed_restarts": runtime.failed_restarts,
        "restart_failures": runtime.failures[:5],
        "restarts_on_audited_version": sum(c["explained"] for c in restart_checks),
        "restarts_with_pool_file_alarm": sum(any("pool file" in a for a in c["alarms"]) for c in restart_checks),
        "restarts_unexplained_version": [c for c in restart_checks if not c["explained"]][:5],
        "audit_verify_cli": {"exit_code": verify.returncode,
                             "said": ((verify.stdout + verify.stderr).strip().splitlines() or [""])[-1][:200]},
        "final_exit_code": exit_code, "aborted": aborted,
        "longest_downtime_s": round(max(runtime.downtimes, default=0.0), 2),
        "median_downtime_s": round(float(np.median(runtime.downtimes)) if runtime.downtimes else 0.0, 2),
        "resent_after_kill": resent, "wall_s": round(wall, 1),
        "rows_equal_parts_equal_acked": aborted is None and len(rows) == args.parts == acked == counters.received,
    }
    report["ok"] = bool(report["rows_equal_parts_equal_acked"] and not unexplained and not report["failed_restarts"]
                        and not crashes and report["restarts_on_audited_version"] == len(restart_checks)
                        and verify.returncode == 0 and exit_code == 0 and not report["missing_parts"]
                        and not report["extra_rows"] and not report["duplicate_rows"])
    if unexplained:
        report["unexplained_examples"] = [(r.part_id, r.reason.label, r.detail[:120]) for r in unexplained[:5]]
    report["kill_log"] = kills
    report["kill_cancelled_at_end"] = cancelled
    report["workdir"] = str(work)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=10.0, help="parts per second")
    parser.add_argument("--hostile", type=float, default=0.05, help="share of hostile messages")
    parser.add_argument("--kill-every", type=int, default=300, help="mean parts between two kill -9")
    parser.add_argument("--kill-modes", default=",".join(KILL_MODES),
                        help=f"moments to kill at, taken in turn (comma-separated: {', '.join(KILL_MODES)})")
    parser.add_argument("--deadline-ms", type=float, default=3000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = soak(args)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
