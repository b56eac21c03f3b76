"""What ``musc-edge status`` shows: counters and latency from the ledger, pool sizes and ages."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..ledger import Ledger


def line_status(storage_dir: str | Path) -> dict:
    """Counters (OK / NG / NO_VERDICT by reason, latency) and pool summaries of a line's storage dir."""
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
        with np.load(path) as data:
            times = data["admitted_time"]
            pools[path.stem] = {"size": int(data["raw_scores"].shape[0]),
                                "identity": json.loads(str(data["identity"])),
                                "newest_age_s": float(time.time() - times.max()) if times.size else None,
                                "oldest_age_s": float(time.time() - times.min()) if times.size else None,
                                "saved_age_s": float(time.time() - path.stat().st_mtime)}
    status["pools"] = pools
    return status


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
    for name, pool in status["pools"].items():
        age = pool["oldest_age_s"]
        lines.append(f"pool {name:<10} {pool['size']} members"
                     + (f", oldest {age / 60:.1f} min, saved {pool['saved_age_s']:.0f} s ago" if age else ""))
    return "\n".join(lines)
