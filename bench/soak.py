"""Soak benchmark (issue #8; `make soak`, not CI): the runtime under hostile input and repeated kill -9.

A ZeroMQ "camera" pushes ``--parts`` synthetic parts at ``--rate`` parts/s into ``musc-edge run`` (the toy
feature model, a real subprocess), ``--hostile`` of them hostile (a 65-byte part id, an encoder beyond
int64, a 30000 x 30000 PNG header, a truncated PNG, a NaN capture time). Every ``--kill-every`` parts
(+- 50 %) the runtime gets SIGKILL at a random moment and is started again. The PLC simulator lives in
this process, so it sees every restart's re-sends.

A frame the runtime had received but not yet recorded when it was killed is lost with it (nothing was
signalled for it: the PLC's inspect window rejects that part). The camera re-sends such frames after the
restart, as a frame grabber with a retry would; they are counted as ``resent_after_kill``.

Prints (and with ``--json`` writes) parts, rows, acknowledged messages, duplicates the PLC absorbed,
NO_VERDICT by reason (and how many are unexplained), restarts, failed restarts and the longest downtime.
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
from musc_edge.edge.sources.fields import safe_part_id  # noqa: E402
from musc_edge.edge.sources.zmq_source import send_frame  # noqa: E402
from tests.hostile import png_declaring  # noqa: E402
from tests.toymodel import build_toy_model  # noqa: E402

HOSTILE_KINDS = ("long_id", "huge_encoder", "bomb", "truncated", "nan_time")


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

    def send(self, image: bytes, part_id: str, kind: str | None, k: int) -> str:
        """Push one part (hostile when ``kind``); returns the id its ledger row will carry."""
        if kind is None:
            send_frame(self.socket, image, part_id=part_id, encoder=k * 100)
        elif kind == "long_id":
            long_id = part_id + "-" + "L" * 70
            send_frame(self.socket, image, part_id=long_id)
            return safe_part_id(long_id)
        elif kind == "huge_encoder":
            send_frame(self.socket, image, part_id=part_id, encoder=2 ** 70)
        elif kind == "bomb":
            send_frame(self.socket, png_declaring(30000, 30000), part_id=part_id)
        elif kind == "truncated":
            send_frame(self.socket, image[:-40], part_id=part_id, encoding="png")
        elif kind == "nan_time":
            header = {"part_id": part_id, "capture_time": float("nan"), "encoding": "png"}
            self.socket.send_multipart([json.dumps(header).encode(), image])
        return part_id


class Runtime:
    """``musc-edge run`` as a subprocess; restarts are timed from the kill to a ready control socket."""

    def __init__(self, config: Path, storage: Path, log: Path) -> None:
        self.config, self.storage, self.log = config, storage, log
        self.proc: subprocess.Popen | None = None
        self.restarts = self.failed_restarts = 0
        self.downtimes: list[float] = []

    def start(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "musc_edge.edge.cli", "run", "--config", str(self.config)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        while not self._ready():
            if self.proc.poll() is not None:
                self.failed_restarts += 1
                raise RuntimeError(f"runtime exited {self.proc.returncode} at start; see {self.log}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"runtime not ready after {timeout} s; see {self.log}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def _ready(self) -> bool:
        from musc_edge.edge.runtime.control import ControlError, request
        try:
            return bool(request(self.storage / "control.sock", {"cmd": "status"}, timeout=2).get("ok"))
        except (ControlError, OSError, ValueError):
            return False

    def kill_and_restart(self) -> None:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.start()
        self.restarts += 1
        self.downtimes.append(time.monotonic() - t0)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def recorded_ids(storage: Path) -> list[str]:
    with Ledger.open_readonly(storage / "ledger.sqlite") as reader:
        return [row.part_id for row in reader.iter_rows()]


def settle(storage: Path, quiet_s: float = 1.5, timeout: float = 60) -> int:
    """Wait until the ledger stops growing for ``quiet_s``; returns its row count."""
    last, since, end = -1, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        now = len(recorded_ids(storage)) if (storage / "ledger.sqlite").is_file() else 0
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return last


def soak(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="musc-soak-"))
    shutil.rmtree(work / "line", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    model = build_toy_model(work / "toy.onnx")
    images = part_images(200, seed=args.seed)
    rng = random.Random(args.seed)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        storage = work / "line"
        config = work / "line.yaml"
        config.write_text(yaml.safe_dump({
            "line": {"name": "soak", "deadline_ms": args.deadline_ms, "queue_size": 16},
            "model": {"path": str(model), "size": 112, "blocks": [6, 9]},
            "recipes": {"default": {"threshold": 1.2, "pool": {"capacity": 24, "min_size": 8,
                                                               "persist_every_s": 2.0}}},
            "source": {"type": "zmq", "endpoint": endpoint, "recipe": "default"},
            "link": {"type": "zmq", "endpoint": plc.address, "heartbeat_interval_s": 0.5},
            "storage": {"dir": str(storage), "archive": {"enabled": False}},
        }))
        runtime = Runtime(config, storage, work / "runtime.log")
        runtime.start()
        camera = Camera(endpoint)
        expected: dict[str, str | None] = {}   # row id -> hostile kind (None: an ordinary part)
        sent: dict[str, tuple[bytes, str | None, int, str]] = {}
        resent = 0
        next_kill = int(args.kill_every * rng.uniform(0.5, 1.5))
        t_start, period = time.monotonic(), 1.0 / args.rate
        for k in range(args.parts):
            due = t_start + k * period
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            kind = rng.choice(HOSTILE_KINDS) if rng.random() < args.hostile else None
            part_id = f"S{k:06d}"
            row_id = camera.send(images[k % len(images)], part_id, kind, k)
            expected[row_id] = kind
            sent[row_id] = (images[k % len(images)], kind, k, part_id)
            if k + 1 == next_kill and k + 1 < args.parts:
                time.sleep(rng.uniform(0, 0.5))              # a random moment, parts in flight
                camera.close()
                runtime.kill_and_restart()
                settle(storage)                              # the restarted runtime re-sends unacked rows
                camera.connect()
                time.sleep(0.3)                              # let the PUSH socket connect
                have = set(recorded_ids(storage))
                for row_id in [r for r in sent if r not in have]:
                    image, kind, j, part_id = sent[row_id]
                    camera.send(image, part_id, kind, j)
                    resent += 1
                    time.sleep(period)
                sent.clear()
                next_kill = k + 1 + int(args.kill_every * rng.uniform(0.5, 1.5))
                t_start = time.monotonic() - (k + 1) * period
                print(f"soak: {k + 1}/{args.parts} parts, restart {runtime.restarts} "
                      f"({runtime.downtimes[-1]:.1f} s down), {resent} re-sent so far", flush=True)
            elif k % 100 == 99:
                sent = {r: v for r, v in sent.items() if v[2] > k - 400}   # long recorded: forget
        settle(storage)
        camera.close()
        exit_code = runtime.stop()
        wall = time.monotonic() - t_start
        with Ledger.open_readonly(storage / "ledger.sqlite") as reader:
            rows = list(reader.iter_rows())
        plc.wait_for(lambda c: c.received >= len(rows), 10)
        counters = plc.counters()
    ids = Counter(r.part_id for r in rows)
    no_verdict = [r for r in rows if r.verdict == Verdict.NO_VERDICT]
    first_scored = next((r.seq for r in rows if r.reason in (Reason.OK, Reason.ANOMALY)), 0)
    unexplained = [r for r in no_verdict if not (
        (expected.get(r.part_id) is not None and r.reason == Reason.DECODE_ERROR)
        or (r.reason == Reason.WARMUP and r.seq < first_scored))]
    report = {
        "parts": args.parts, "rate": args.rate, "hostile": sum(v is not None for v in expected.values()),
        "rows": len(rows), "distinct_row_ids": len(ids), "missing_parts": len(set(expected) - set(ids)),
        "extra_rows": len(set(ids) - set(expected)), "duplicate_rows": sum(n - 1 for n in ids.values()),
        "acked_rows": sum(r.acked for r in rows), "plc_logged_once": counters.received,
        "plc_duplicates_absorbed": counters.duplicates, "plc_out_of_order": counters.out_of_order,
        "no_verdict_by_reason": dict(Counter(r.reason.label for r in no_verdict)),
        "unexplained_no_verdict": len(unexplained), "restarts": runtime.restarts,
        "failed_restarts": runtime.failed_restarts, "final_exit_code": exit_code,
        "longest_downtime_s": round(max(runtime.downtimes, default=0.0), 2),
        "median_downtime_s": round(float(np.median(runtime.downtimes)) if runtime.downtimes else 0.0, 2),
        "resent_after_kill": resent, "wall_s": round(wall, 1),
        "rows_equal_parts_equal_acked": len(rows) == args.parts == sum(r.acked for r in rows) == counters.received,
    }
    if unexplained:
        report["unexplained_examples"] = [(r.part_id, r.reason.label, r.detail[:120]) for r in unexplained[:5]]
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=10.0, help="parts per second")
    parser.add_argument("--hostile", type=float, default=0.05, help="share of hostile messages")
    parser.add_argument("--kill-every", type=int, default=300, help="mean parts between two kill -9")
    parser.add_argument("--deadline-ms", type=float, default=3000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = soak(args)
    for key, value in report.items():
        print(f"{key:>30}: {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = report["rows_equal_parts_equal_acked"] and not report["unexplained_no_verdict"] \
        and not report["failed_restarts"] and report["final_exit_code"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
