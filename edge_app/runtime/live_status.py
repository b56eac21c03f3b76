"""The running line's live counters (:class:`LineStats`, kept by the output thread) and what is shown of the
line while it runs: the console status line and the control socket's ``status`` reply (``musc-calibrate
status``, ``musc-edge status``, the view and the Prometheus gauges read it). The ledger holds the durable truth."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from ..links import RejectLink
from ..record import PartRecord, Reason, Verdict
from .in_force import InForce

RECENT = 10_000  # parts kept for live latency percentiles


@dataclass
class LineStats:
    """Live counters kept by the output thread; ``lock`` guards them against the readers."""

    parts: int = 0
    by_verdict: dict[str, int] = field(default_factory=lambda: {v.value: 0 for v in Verdict})
    by_reason: dict[str, int] = field(default_factory=dict)
    acked: int = 0
    late_acks: int = 0
    send_failures: int = 0
    # Recent scored parts only (bounded: a line runs for months); the ledger keeps every part.
    stages: dict[str, deque] = field(default_factory=lambda: {k: deque(maxlen=RECENT) for k in
                                                            ("decode", "features", "scoring", "link", "total", "wait")})
    alarms: deque = field(default_factory=lambda: deque(maxlen=100))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def percentiles(self, values) -> dict[str, float]:
        if len(values) == 0:
            return {}
        arr = np.asarray(values) * 1e3
        return {"min": float(arr.min()), "p50": float(np.median(arr)), "p99": float(np.percentile(arr, 99)),
                "max": float(arr.max())}

    def count(self, part: PartRecord) -> None:
        """A part whose row is written and whose signal went out (or was not to)."""
        with self.lock:
            self.parts += 1
            self.by_verdict[part.verdict.value] += 1
            if part.verdict == Verdict.NO_VERDICT:
                self.by_reason[part.reason.label] = self.by_reason.get(part.reason.label, 0) + 1
            if part.reason in (Reason.OK, Reason.ANOMALY):
                for stage in self.stages:
                    self.stages[stage].append(getattr(part.times, stage))

    def count_ack(self, late: bool) -> None:
        with self.lock:
            self.acked += 1
            self.late_acks += int(late)

    def count_send_failure(self) -> None:
        with self.lock:
            self.send_failures += 1

    def alarm(self, text: str) -> None:
        with self.lock:
            self.alarms.append(text)


def status_line(stats: LineStats, recipes: dict, link: RejectLink | None) -> str:
    """One console line: counters, link, pools and latency."""
    with stats.lock:
        s = stats
        lat = s.percentiles(s.stages["total"])
        nv = " ".join(f"{k}={v}" for k, v in sorted(s.by_reason.items()))
        text = (f"parts {s.parts:>5} | OK {s.by_verdict['ACCEPT']:>4} NG {s.by_verdict['REJECT']:>4} "
                f"NV {s.by_verdict['NO_VERDICT']:>3}{' (' + nv + ')' if nv else ''} | "
                f"acked {s.acked:>5}")
    pools = " ".join(f"{name} {rp.pool.size}/{rp.pool.capacity}" for name, rp in recipes.items())
    shown = ""
    if link is not None:
        h = link.health()
        shown = f" | link {'up' if h.connected else 'DOWN'} outbox {h.outbox_depth}"
    latency = f" | p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms" if lat else ""
    return f"{text}{shown} | pool {pools}{latency}"


def control_status(line: str, in_force: InForce, recipes: dict, stats: LineStats, link: RejectLink | None,
                   queue_depth: int, storage: str) -> dict:
    """What `musc-calibrate status` shows of a running line (the control socket's ``status`` reply)."""
    pools = {}
    now = time.time()
    for name, rp in recipes.items():
        pool = rp.pool
        times = pool.admitted_time[:pool.size]
        pools[name] = {"threshold": rp.threshold, "pool": {
            "size": pool.size, "capacity": pool.capacity, "min_size": pool.min_size,
            "golden": int(pool.golden[:pool.size].sum()),
            "oldest_age_s": float(now - times.min()) if pool.size else None,
            "newest_age_s": float(now - times.max()) if pool.size else None,
            "raw_scores": [float(x) for x in pool.raw_scores[:pool.size]]}}
    with stats.lock:
        counters = {"parts": stats.parts, "by_verdict": dict(stats.by_verdict),
                    "by_reason": dict(stats.by_reason), "acked": stats.acked,
                    "latency_ms": stats.percentiles(stats.stages["total"]),
                    # capture to signal less the look-ahead wait: what the line needs (a shorter deadline shortens
                    # the wait; musc-calibrate's reject-timing check reads this)
                    "latency_needed_ms": stats.percentiles(np.subtract(stats.stages["total"], stats.stages["wait"])),
                    "alarms": list(stats.alarms)[-10:]}
    timing = in_force.reject_timing
    return {"line": line, "calibration_version": in_force.version, "dry_run": in_force.dry_run,
            "reject_timing": None if timing is None else timing.model_dump(), "recipes": pools, "stats": counters,
            "link": None if link is None else asdict(link.health()), "queue_depth": queue_depth, "storage": storage}
