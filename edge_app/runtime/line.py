"""The running line: source -> bounded queue -> inspector -> ledger -> reject link -> archive.

Threads and their contracts:
- *source*: pulls parts at the line's pace and stamps each with its deadline; when the engine queue is
  full the part gets NO_VERDICT (overload) on the spot and goes straight to the output stage. Nothing is
  dropped: every part reaches the output stage exactly once.
- *prefetch*: decode and features of the next part while the worker scores this one (one part ahead).
- *worker*: one part at a time through the rest of the inspector (scoring, verdict) and pool admission;
  a part whose deadline has passed gets NO_VERDICT (deadline).
- *output*: applies the fail-safe policy, writes the ledger row durably (its row id is the wire sequence
  number), *then* signals the PLC within the part's deadline, records acks (also late ones, reported by
  the link), and hands rejects to the archive. It is the only thread that writes the ledger.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..archive import RejectArchive
from ..config import LineConfig
from ..ledger import Ledger
from ..links import RejectLink, open_link
from ..record import FailSafe, PartRecord, Reason, Verdict
from ..sources.base import FrameSource, SourceError, make_source
from .calibration_state import Calibration, RejectTiming, load_current
from .control import ControlError, ControlServer, ensure_token
from .inspector import Inspector
from .systemd import SystemdNotifier

log = logging.getLogger(__name__)
_DONE = object()
RECENT = 10_000  # parts kept for live latency percentiles


def signalled_verdict(part: PartRecord, fail_safe: FailSafe) -> Verdict:
    """What goes to the PLC: the verdict itself, or the fail-safe action when there is none."""
    if part.verdict in (Verdict.ACCEPT, Verdict.REJECT):
        return part.verdict
    return Verdict.ACCEPT if fail_safe == FailSafe.PASS_FLAGGED else Verdict.REJECT


@dataclass
class LineStats:
    """Live counters kept by the output thread (the ledger holds the durable truth)."""

    parts: int = 0
    by_verdict: dict[str, int] = field(default_factory=lambda: {v.value: 0 for v in Verdict})
    by_reason: dict[str, int] = field(default_factory=dict)
    acked: int = 0
    late_acks: int = 0
    send_failures: int = 0
    # Recent scored parts only (bounded: a line runs for months); the ledger keeps every part.
    stages: dict[str, deque] = field(default_factory=lambda: {k: deque(maxlen=RECENT) for k in
                                                            ("decode", "features", "scoring", "link", "total")})
    alarms: deque = field(default_factory=lambda: deque(maxlen=100))

    def percentiles(self, values) -> dict[str, float]:
        if not values:
            return {}
        arr = np.asarray(values) * 1e3
        return {"min": float(arr.min()), "p50": float(np.median(arr)), "p99": float(np.percentile(arr, 99)),
                "max": float(arr.max())}


class Line:
    """Owns the runtime's threads and resources. ``run()`` blocks until the source ends or ``stop()``."""

    def __init__(self, config: LineConfig, *, source: FrameSource | None = None, inspector: Inspector | None = None,
                 status: Callable[[str], None] | None = None, status_every_s: float = 1.0):
        self.config = config
        self.storage = Path(config.storage.dir)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.inspector = inspector or Inspector(config)
        self.source = source or make_source(config.source)
        self.calibration_version = "0"
        self.dry_run = config.line.dry_run
        self.reject_timing: RejectTiming | None = None
        calibration = load_current(self.storage, set(config.recipes))
        if calibration is not None:
            self._apply_calibration(calibration)
        self.model_hash = self.inspector.engine.manifest.model_sha256[:16]
        self.config_hash = config.config_hash()
        self.stats = LineStats()
        self._status = status
        self._status_every = status_every_s
        self._in: queue.Queue = queue.Queue(maxsize=config.line.queue_size)
        self._ready: queue.Queue = queue.Queue(maxsize=1)  # (part, its features) extracted ahead of scoring
        self._out: queue.Queue = queue.Queue()
        self._acks: queue.Queue = queue.Queue()
        self._tasks: queue.Queue = queue.Queue()       # control changes, run by the worker between parts
        self._persist: queue.Queue = queue.Queue(maxsize=1)  # pool snapshots for the writer thread
        self._speed: tuple[float, float] | None = None  # (encoder, monotonic) of the last part, for counts/s
        self._counts_per_s: float | None = None
        self.control: ControlServer | None = None
        self._waiters: dict[int, threading.Event] = {}
        self.systemd = SystemdNotifier()
        self._stop = threading.Event()
        self._stats_lock = threading.Lock()
        self._deadline_s = config.line.deadline_ms / 1e3
        self.restored = self.inspector.restore_pools()
        self._last_persist = time.monotonic()
        self.ledger: Ledger | None = None
        self.link: RejectLink | None = None
        self.archive: RejectArchive | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def run(self) -> LineStats:
        """Inspect every part the source delivers; returns the final counters."""
        self.ledger = Ledger(self.storage / "ledger.sqlite")
        control_path = self.config.control.socket or self.storage / "control.sock"
        self.control = ControlServer(control_path, ensure_token(self.storage), self._handle_control)
        # The link is up even in dry-run: dry-run is a calibration switch that can change while running,
        # and heartbeats and test fires still go out.
        self.link = open_link(self.config.link, on_ack=self._on_ack, on_alarm=self._on_alarm,
                              on_alarm_cleared=lambda text: log.info("alarm cleared: %s", text))
        for row in self.ledger.unacked():  # signalled before a crash but never acknowledged
            self.link.resend(row.seq, row.part_id, Verdict(row.signalled), Reason(row.reason))
        archive = self.config.storage.archive
        if archive.enabled:
            self.archive = RejectArchive(self.storage / "archive", int(archive.quota_mb * 2**20),
                                         accepted_fraction=archive.sample_accepted, no_verdict_fraction=1.0)
        threads = [threading.Thread(target=self._source_loop, name="source", daemon=True),
                   threading.Thread(target=self._prefetch_loop, name="prefetch", daemon=True),
                   threading.Thread(target=self._worker_loop, name="worker", daemon=True)]
        persist = threading.Thread(target=self._persist_loop, name="pool-writer", daemon=True)
        persist.start()
        status = threading.Thread(target=self._status_loop, name="status", daemon=True)
        for t in threads:
            t.start()
        status.start()
        self.systemd.ready(f"line {self.config.line.name}: pools {self.restored}")
        try:
            self._output_loop()
        finally:
            self._stop.set()
            for t in threads:
                t.join(timeout=5)
            self._persist.put(None)
            persist.join(timeout=30)
            self._shutdown()
        return self.stats

    def stop(self) -> None:
        """Ask the line to finish: the source stops, queued parts are still decided and signalled."""
        self._stop.set()
        try:
            self.source.close()
        except Exception:  # closing a source that is mid-read may race; the loop ends either way
            log.debug("source close raised", exc_info=True)

    def _shutdown(self) -> None:
        self.systemd.stopping()
        if self.control is not None:
            self.control.close()
        self._run_tasks()
        self.inspector.save_pools()
        if self.link is not None:
            deadline = time.monotonic() + 2.0
            while self.link.health().outbox_depth and time.monotonic() < deadline:
                time.sleep(0.02)
            self._drain_acks()
            self.link.close()
        self._drain_acks()
        if self.archive is not None:
            self.archive.close(timeout=10)
        if self.ledger is not None:
            self.ledger.close()

    # -- threads ---------------------------------------------------------------------------------------------
    def _source_loop(self) -> None:
        try:
            with self.source:
                for part in self.source.parts():
                    part.capture_monotonic = part.capture_monotonic or time.monotonic()
                    part.deadline = self._deadline(part)
                    try:
                        self._in.put_nowait(part)
                    except queue.Full:
                        part.decide(Verdict.NO_VERDICT, Reason.OVERLOAD,
                                    f"engine queue full ({self.config.line.queue_size} parts waiting)")
                        self._out.put(("part", part, None))
                    if self._stop.is_set():
                        break
        except SourceError as exc:  # an expected operational failure (camera unplugged, port gone)
            self._on_alarm(f"frame source failed: {exc}")
        except Exception as exc:
            log.exception("frame source failed")
            self._on_alarm(f"frame source failed: {exc}")
        finally:
            self._in.put(_DONE)

    def _prefetch_loop(self) -> None:
        """Decode and features of part n+1 while part n is scored and signalled; order is kept."""
        while True:
            part = self._in.get()
            if part is _DONE:
                self._ready.put((_DONE, None))
                return
            # A part already late is not worked on: the worker gives it its NO_VERDICT (deadline).
            extracted = self.inspector.extract(part) if time.monotonic() < part.deadline else None
            self._ready.put((part, extracted))

    def _worker_loop(self) -> None:
        while True:
            self.systemd.watchdog()  # from the scoring loop itself: a hung engine call stops the pings
            self._run_tasks()
            try:
                part, extracted = self._ready.get(timeout=0.05)
            except queue.Empty:
                continue
            if part is _DONE:
                self._run_tasks()
                self._out.put(("done",))
                return
            deadline = part.deadline
            if time.monotonic() >= deadline:
                part.decide(Verdict.NO_VERDICT, Reason.DEADLINE, "deadline passed while queued")
                self._out.put(("part", part, None))
                continue
            part, prepared = self.inspector.inspect(part, extracted)
            if time.monotonic() > deadline and part.verdict != Verdict.NO_VERDICT:
                part.decide(Verdict.NO_VERDICT, Reason.DEADLINE,
                            f"scored {part.verdict.value} after the deadline (score {part.score:.4f})")
            self.inspector.admit(part, prepared)
            self._out.put(("part", part, prepared))
            self._maybe_persist()

    def _maybe_persist(self) -> None:
        """Periodic pool persistence: the worker only copies the pools; a writer thread does the disk I/O."""
        every = min(rp.settings.pool.persist_every_s for rp in self.inspector.pools.values())
        if time.monotonic() - self._last_persist < every:
            return
        self._last_persist = time.monotonic()
        try:
            self._persist.put_nowait(self.inspector.snapshot_pools())
        except queue.Full:
            log.debug("pool persistence still busy; the next period will catch up")

    def _persist_loop(self) -> None:
        while (snapshot := self._persist.get()) is not None:
            try:
                self.inspector.write_pools(snapshot)
            except OSError as exc:
                self._on_alarm(f"pool could not be saved: {exc}")

    def _output_loop(self) -> None:
        while True:
            try:
                item = self._out.get(timeout=0.1)
            except queue.Empty:
                self._drain_acks()
                continue
            if item[0] == "done":
                return
            self._emit(item[1])

    def _deadline(self, part: PartRecord) -> float:
        """Monotonic time by which the verdict must reach the PLC (reject timing, else line.deadline_ms)."""
        timing = self.reject_timing
        if timing is None:
            return part.capture_monotonic + self._deadline_s
        lead = timing.actuator_lead_ms / 1e3
        if timing.mode == "time":
            return part.capture_monotonic + timing.delay_ms / 1e3 - lead
        # Encoder mode: counts to the ejector over the conveyor speed measured from recent parts' stamps.
        if part.encoder is not None:
            if self._speed is not None and part.capture_monotonic > self._speed[1]:
                rate = (part.encoder - self._speed[0]) / (part.capture_monotonic - self._speed[1])
                if rate > 0:
                    self._counts_per_s = rate if self._counts_per_s is None else 0.8 * self._counts_per_s + 0.2 * rate
            self._speed = (part.encoder, part.capture_monotonic)
        if self._counts_per_s is None:
            return part.capture_monotonic + self._deadline_s
        return part.capture_monotonic + timing.counts / self._counts_per_s - lead

    def _emit(self, part: PartRecord) -> None:
        """Ledger first (durable), then the PLC, then the archive."""
        part.signalled = signalled_verdict(part, self.config.line.fail_safe)
        dry_run = self.dry_run and not part.test_part
        part.times.total = time.monotonic() - part.capture_monotonic
        try:
            seq = self.ledger.reserve(part, model_hash=self.model_hash, config_hash=self.config_hash,
                                      calibration_version=self.calibration_version, dry_run=dry_run)
        except Exception as exc:
            # Without a durable row nothing may be signalled: stop, and let the PLC's inspect window
            # reject every part that gets no verdict (the documented fail-safe of the wire protocol).
            self._on_alarm(f"ledger write failed, line stopping: {exc}")
            raise
        if self.link is not None and not dry_run:
            deadline = part.deadline or part.capture_monotonic + self._deadline_s
            t0 = time.monotonic()
            result = self.link.send(seq, part.part_id, part.signalled, part.reason, max(deadline, t0 + 0.05))
            part.times.link = time.monotonic() - t0
            part.times.total = time.monotonic() - part.capture_monotonic
            self.ledger.update_link_time(seq, part.times.link, total=part.times.total)
            if not result.acked:
                with self._stats_lock:
                    self.stats.send_failures += 1
            part.acked = result.acked
        waiter = self._waiters.pop(id(part), None)
        if waiter is not None:
            waiter.set()
        self._drain_acks()
        if self.archive is not None and not part.test_part:
            self.archive.submit(part)
        self._count(part)
        if part.verdict == Verdict.NO_VERDICT and self.config.line.fail_safe == FailSafe.STOP_LINE:
            self._on_alarm(f"line stop requested: part {part.part_id} got no verdict ({part.reason.label})")
        part.image = part.raw = None  # free the frame; the ledger and archive have what they need

    def _on_ack(self, seq: int, late: bool) -> None:
        # Runs on the link's thread: only the output thread writes the ledger, so hand the ack over.
        self._acks.put((seq, late, time.time()))

    def _drain_acks(self) -> None:
        while True:
            try:
                seq, late, when = self._acks.get_nowait()
            except queue.Empty:
                return
            self._record_ack(seq, late, when)

    def _record_ack(self, seq: int, late: bool, when: float) -> None:
        self.ledger.mark_acked(seq, late=late, when=when)
        with self._stats_lock:
            self.stats.acked += 1
            self.stats.late_acks += int(late)

    def _on_alarm(self, text: str) -> None:
        log.warning("ALARM: %s", text)
        with self._stats_lock:
            self.stats.alarms.append(text)

    def _count(self, part: PartRecord) -> None:
        with self._stats_lock:
            s = self.stats
            s.parts += 1
            s.by_verdict[part.verdict.value] += 1
            if part.verdict == Verdict.NO_VERDICT:
                s.by_reason[part.reason.label] = s.by_reason.get(part.reason.label, 0) + 1
            if part.reason in (Reason.OK, Reason.ANOMALY):
                for stage in s.stages:
                    s.stages[stage].append(getattr(part.times, stage))

    # -- calibration and control ---------------------------------------------------------------------------
    def _apply_calibration(self, calibration: Calibration) -> None:
        for name, recipe in calibration.recipes.items():
            self.inspector.pools[name].threshold = recipe.threshold
        self.reject_timing = calibration.reject_timing
        self.dry_run = self.config.line.dry_run or calibration.dry_run
        self.calibration_version = str(calibration.version)

    def _run_tasks(self) -> None:
        """Run queued control changes (worker thread, between two parts)."""
        while True:
            try:
                task, done, box = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                box["result"] = task()
            except Exception as exc:
                box["error"] = exc
            done.set()

    def _between_parts(self, task: Callable[[], dict], timeout: float = 60.0) -> dict:
        """Have the worker run ``task`` between two parts and return its result."""
        done, box = threading.Event(), {}
        self._tasks.put((task, done, box))
        if not done.wait(timeout):
            raise ControlError(f"the line did not reach a gap between parts within {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _recipe_pool(self, request: dict):
        name = request.get("recipe", "default")
        if name not in self.inspector.pools:
            raise ControlError(f"unknown recipe {name!r}: this line has {sorted(self.inspector.pools)}")
        return self.inspector.pools[name]

    def _slots(self, pool, request: dict):
        if request.get("all"):
            return np.flatnonzero(~pool.golden[:pool.size]) if not request.get("include_golden") else np.arange(pool.size)
        if "lowest" in request:
            order = np.argsort(pool.raw_scores[:pool.size])
            return order[:int(request["lowest"])]
        wanted = set(request.get("part_ids") or [])
        slots = [i for i, pid in enumerate(pool.part_ids[:pool.size]) if pid in wanted]
        missing = wanted - {pool.part_ids[i] for i in slots}
        if missing:
            raise ControlError(f"not pool members: {sorted(missing)}")
        return np.array(slots, int)

    def _handle_control(self, request: dict) -> dict:
        """Control-socket requests; see edge_app/runtime/control.py for the protocol."""
        from .calibration_state import CalibrationError, parse_calibration

        cmd = request["cmd"]
        if cmd == "status":
            return self.control_status()
        if cmd == "pool_inspect":
            rp = self._recipe_pool(request)
            pool = rp.pool
            return {"recipe": rp.name, "members": [
                {"slot": i, "part_id": pool.part_ids[i], "raw_score": float(pool.raw_scores[i]),
                 "admitted_time": float(pool.admitted_time[i]), "golden": bool(pool.golden[i])}
                for i in range(pool.size)]}
        if cmd == "pool_scores":
            rp = self._recipe_pool(request)
            return {"recipe": rp.name, "threshold": rp.threshold,
                    "scores": self._between_parts(lambda: rp.pool.leave_one_out_scores(self.inspector.params))}
        if cmd == "apply":
            try:
                calibration = parse_calibration(request.get("calibration") or {}, set(self.config.recipes))
            except CalibrationError as exc:
                raise ControlError(str(exc)) from None

            def apply() -> dict:
                self._apply_calibration(calibration)
                return {"version": calibration.version}
            return self._between_parts(apply)
        if cmd in ("pool_purge", "pool_freeze", "pool_unfreeze"):
            rp = self._recipe_pool(request)

            def change() -> dict:
                slots = self._slots(rp.pool, request)
                if cmd == "pool_purge":
                    golden = [rp.pool.part_ids[i] for i in slots if rp.pool.golden[i]]
                    if golden and not request.get("include_golden"):
                        raise ControlError(f"golden members are never purged implicitly: {golden}; "
                                           f"unfreeze them first")
                    rp.pool.remove(slots)
                else:
                    rp.pool.golden[slots] = cmd == "pool_freeze"
                self._persist.put(self.inspector.snapshot_pools())  # in order, by the writer thread
                return {"changed": int(len(slots)), "size": rp.pool.size,
                        "golden": int(rp.pool.golden[:rp.pool.size].sum())}
            return self._between_parts(change)
        if cmd == "pool_reseed":
            from .seed import prepare_folder, admit_prepared

            rp = self._recipe_pool(request)
            prepared = prepare_folder(self.inspector, request.get("folder", ""))  # features off the worker

            def reseed() -> dict:
                rp.pool.remove(np.flatnonzero(~rp.pool.golden[:rp.pool.size]))
                size = admit_prepared(self.inspector, rp.name, prepared)
                self._persist.put(self.inspector.snapshot_pools())  # in order, by the writer thread
                return {"size": size}
            return self._between_parts(reseed)
        if cmd == "test_fire":
            part_id = str(request.get("part_id") or f"TEST-{int(time.time())}")
            part = PartRecord(part_id=part_id, recipe=request.get("recipe", "default"), capture_time=time.time(),
                              test_part=True)
            part.decide(Verdict.REJECT, Reason.TEST_FIRE, "technician test fire")
            part.deadline = time.monotonic() + self._deadline_s
            done = threading.Event()
            self._waiters[id(part)] = done
            self._out.put(("part", part, None))
            if not done.wait(30):
                raise ControlError("the test fire was queued but not signalled within 30 s")
            return {"part_id": part_id, "seq": part.seq, "acked": part.acked}
        raise ControlError(f"unknown command {cmd!r}")

    def control_status(self) -> dict:
        """What `musc-calibrate status` shows of a running line."""
        recipes = {}
        now = time.time()
        for name, rp in self.inspector.pools.items():
            pool = rp.pool
            times = pool.admitted_time[:pool.size]
            recipes[name] = {"threshold": rp.threshold, "pool": {
                "size": pool.size, "capacity": pool.capacity, "min_size": pool.min_size,
                "golden": int(pool.golden[:pool.size].sum()),
                "oldest_age_s": float(now - times.min()) if pool.size else None,
                "newest_age_s": float(now - times.max()) if pool.size else None,
                "raw_scores": [float(x) for x in pool.raw_scores[:pool.size]]}}
        with self._stats_lock:
            stats = {"parts": self.stats.parts, "by_verdict": dict(self.stats.by_verdict),
                     "by_reason": dict(self.stats.by_reason), "acked": self.stats.acked,
                     "latency_ms": self.stats.percentiles(self.stats.stages["total"]),
                     "alarms": list(self.stats.alarms)[-10:]}
        link = None
        if self.link is not None:
            from dataclasses import asdict

            link = asdict(self.link.health())
        return {"line": self.config.line.name, "calibration_version": self.calibration_version,
                "dry_run": self.dry_run, "reject_timing": None if self.reject_timing is None
                else self.reject_timing.model_dump(), "recipes": recipes, "stats": stats, "link": link,
                "queue_depth": self._in.qsize(), "storage": str(self.storage)}

    def ledger_rows(self) -> list:
        """Every ledger row, read through a separate read-only connection."""
        reader = Ledger.open_readonly(self.storage / "ledger.sqlite")
        try:
            return list(reader.iter_rows())
        finally:
            reader.close()

    # -- status ----------------------------------------------------------------------------------------------
    def status_line(self) -> str:
        with self._stats_lock:
            s = self.stats
            lat = s.percentiles(s.stages["total"])
            nv = " ".join(f"{k}={v}" for k, v in sorted(s.by_reason.items()))
            text = (f"parts {s.parts:>5} | OK {s.by_verdict['ACCEPT']:>4} NG {s.by_verdict['REJECT']:>4} "
                    f"NV {s.by_verdict['NO_VERDICT']:>3}{' (' + nv + ')' if nv else ''} | "
                    f"acked {s.acked:>5}")
        pools = " ".join(f"{name} {rp.pool.size}/{rp.pool.capacity}" for name, rp in self.inspector.pools.items())
        link = ""
        if self.link is not None:
            h = self.link.health()
            link = f" | link {'up' if h.connected else 'DOWN'} outbox {h.outbox_depth}"
        latency = f" | p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms" if lat else ""
        return f"{text}{link} | pool {pools}{latency}"

    def _status_loop(self) -> None:
        while not self._stop.wait(self._status_every):
            if self._status:
                self._status(self.status_line())
