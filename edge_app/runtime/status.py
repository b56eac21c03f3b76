"""What ``musc-edge status`` shows: counters and latency from the ledger, pool sizes and ages: live from the
running line when one answers on the control socket (its read-only ``status`` command), else as last saved."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..ledger import Ledger
from .pool_store import DAMAGED_FILE_ERRORS


def line_status(storage_dir: str | Path, control_socket: str | Path | None = None, timeout_s: float = 2.0) -> dict:
    """Counters (OK / NG / NO_VERDICT by reason, latency) and pool summaries of a line's storage dir. When a line
    answers on ``control_socket`` (default ``storage/control.sock``) within ``timeout_s``, ``running`` is true,
    ``live`` holds its calibration, link, queue and alarms, and each pool is as the line holds it now."""
    storage = Path(storage_dir)
    ledger_path = storage / "ledger.sqlite"
    if not ledger_path.is_file():
        raise FileNotFoundError(f"no ledger at {ledger_path}: has this line run yet?")
    reader = Ledger.open_readonly(ledger_path)
    try:
        status = {"storage": str(storage), "counters": reader.counters()}
    finally:
        reader.close()
    pools = {}
    for path in sorted((storage / "pools").glob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as data:
                times = data["admitted_time"]
                pools[path.stem] = {"size": int(data["raw_scores"].shape[0]),
                                    "identity": json.loads(str(data["identity"])),
                                    "newest_age_s": float(time.time() - times.max()) if times.size else None,
                                    "oldest_age_s": float(time.time() - times.min()) if times.size else None,
                                    "saved_age_s": float(time.time() - path.stat().st_mtime)}
        except DAMAGED_FILE_ERRORS as exc:   # the line restores the previous file at its next start
            pools[path.stem] = {"size": 0, "damaged": f"{type(exc).__name__}: {exc}"[:120]}
    status["pools"] = pools
    live = _live_status(Path(control_socket or storage / "control.sock"), timeout_s)
    status["running"] = live is not None
    if live is not None:
        for name, recipe in live.get("recipes", {}).items():
            pool = {k: v for k, v in recipe.get("pool", {}).items() if k != "raw_scores"}
            pools[name] = {**pools.get(name, {}), **pool, "threshold": recipe.get("threshold"), "live": True}
        status["live"] = {k: live.get(k) for k in ("line", "calibration_version", "dry_run", "reject_timing",
                                                     "link", "queue_depth")}
        status["live"]["alarms"] = live.get("stats", {}).get("alarms", [])
    return status


def _live_status(control_socket: Path, timeout_s: float) -> dict | None:
    """The running line's own status (read-only, no token needed), or None when no line answers."""
    from .control import ControlError, request

    if not control_socket.exists():
        return None
    try:
        reply = request(control_socket, {"cmd": "status"}, timeout=timeout_s)
    except (ControlError, OSError, ValueError):
        return None
    return reply if reply.get("ok") else None


def format_status(status: dict) -> str:
    """The status as a few aligned lines a technician can read."""
    c = status["counters"]
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(c["no_verdict_by_reason"].items()))
    lines = [f"line storage  {status['storage']}",
             f"parts {c['parts']}   OK {c['ok']}   NG {c['ng']}   NO_VERDICT {c['no_verdict']}"
             + (f" ({reasons})" if reasons else ""),
             f"acked {c['acked']}   unacked {c['unacked']}   late acks {c['ack_late']}   test parts {c['test_parts']}",
             f"{'latency ms':<12}{'min':>8}{'median':>8}{'p99':>8}{'max':>8}"]
    for stage, stats in c["latency"].items():
        if stats.get("n"):
            lines.append(f"  {stage:<10}" + "".join(f"{1e3 * stats[k]:8.1f}" for k in ("min", "median", "p99", "max")))
    live = status.get("live")
    if live is not None:
        link = live.get("link") or {}
        lines.insert(1, f"running       calibration v{live['calibration_version']}"
                        + (" (dry run)" if live.get("dry_run") else "")
                        + (f", link {'up' if link.get('connected') else 'DOWN'} outbox {link.get('outbox_depth')}"
                           + (f" epoch {link['epoch']:08X}" if link.get("epoch") else "")
                           if link else "") + f", queue {live.get('queue_depth')}")
    for name, pool in status["pools"].items():
        if "damaged" in pool and not pool.get("live"):
            lines.append(f"pool {name:<10} DAMAGED file ({pool['damaged']}); the line restores the previous "
                         "one at its next start")
            continue
        age, newest = pool.get("oldest_age_s"), pool.get("newest_age_s")
        size = f"{pool['size']}/{pool['capacity']}" if "capacity" in pool else str(pool["size"])
        saved = f", saved {pool['saved_age_s']:.0f} s ago" if "saved_age_s" in pool else ", not saved yet"
        # The newest member's age: a pool whose parts all score above its admission ceiling stops refreshing.
        lines.append(f"pool {name:<10} {size} members{' (live)' if pool.get('live') else ''}"
                     + (f", oldest {age / 60:.1f} min, newest {newest / 60:.1f} min{saved}" if age else ""))
    if live is not None and live["alarms"]:
        lines.append("recent alarms: " + " | ".join(live["alarms"][-3:]))
    return "\n".join(lines)
