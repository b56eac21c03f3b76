"""The embedded default: a simulated line. Synthetic parts on a replayed conveyor, inspected by the full
runtime, signalled over a real ZeroMQ link to an in-process PLC simulator; ground truth is known, so the
summary also says how many defects were caught and how many good parts were rejected."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..config import parse_config
from ..plc_sim import PlcSimulator
from ..synthetic import generate_set
from .inspector import Inspector
from .line import Line
from .seed import seed_pool


def _status_printer(stream=sys.stderr):
    tty = hasattr(stream, "isatty") and stream.isatty()

    def show(text: str) -> None:
        stream.write(("\r" + text[:150].ljust(150)) if tty else text + "\n")
        stream.flush()
    return show


def run_simulated_line(workdir: Path | None = None, parts: int = 60, rate: float = 4.0, seed: int = 0,
                       model: Path | None = None) -> int:
    """Run the simulated line end to end and print its summary; returns a process exit code."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="musc-line-"))
    line_parts = generate_set(workdir / "conveyor", n=parts, defect_fraction=0.15, seed=seed + 1)
    seed_parts = generate_set(workdir / "recent", n=24, defect_fraction=0.1, seed=seed + 2)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*", log_path=workdir / "plc.jsonl") as plc:
        raw = {
            "line": {"name": "simulated", "deadline_ms": 1500, "queue_size": 4},
            "recipes": {"default": {"threshold": 1.0, "pool": {"capacity": 40, "min_size": 10}}},
            "source": {"type": "replay", "path": str(line_parts / "test"), "pattern": "*/*.png",
                       "rate": rate, "shuffle": True, "seed": seed, "recipe": "default"},
            "link": {"type": "zmq", "endpoint": plc.address, "heartbeat_interval_s": 0.5},
            "storage": {"dir": str(workdir / "line")},
        }
        if model:
            raw["model"] = {"path": str(model)}
        config = parse_config(raw, "simulated line")
        inspector = Inspector(config)
        print(f"simulated line in {workdir}: {parts} parts at {rate}/s, PLC simulator on {plc.address}",
              file=sys.stderr)
        size = seed_pool(inspector, "default", seed_parts / "test", progress=False)
        print(f"pool seeded from {size} recent unlabeled captures", file=sys.stderr)
        line = Line(config, inspector=inspector, status=_status_printer())
        stats = line.run()
        plc_counters = plc.counters()
    print(file=sys.stderr)
    truth = {p.name: p.parent.name for p in (line_parts / "test").glob("*/*.png")}
    print(summarise(line, stats, plc_counters, truth))
    return 0 if stats.parts == parts and plc_counters.received == parts else 1


def summarise(line: Line, stats, plc_counters, truth: dict[str, str] | None = None) -> str:
    """The final summary: parts, verdicts, acknowledgements, latency percentiles."""
    lines = [f"parts        {stats.parts}",
             f"verdicts     ACCEPT {stats.by_verdict['ACCEPT']}  REJECT {stats.by_verdict['REJECT']}  "
             f"NO_VERDICT {stats.by_verdict['NO_VERDICT']}"
             + (f" ({', '.join(f'{k} {v}' for k, v in sorted(stats.by_reason.items()))})" if stats.by_reason else ""),
             f"PLC          received {plc_counters.received}  duplicates {plc_counters.duplicates}  "
             f"heartbeats {plc_counters.heartbeats}  acked by runtime {stats.acked} (late {stats.late_acks})"]
    for stage in ("decode", "features", "scoring", "link", "total"):
        p = stats.percentiles(stats.stages[stage])
        if p:
            lines.append(f"{stage:<12} min {p['min']:6.1f}  p50 {p['p50']:6.1f}  p99 {p['p99']:6.1f}  "
                         f"max {p['max']:6.1f} ms")
    if truth:
        rows = line.ledger_rows()
        defective = [r for r in rows if truth.get(Path(r.source_ref or "").name, "good") != "good"]
        good = [r for r in rows if truth.get(Path(r.source_ref or "").name, "good") == "good"]
        caught = sum(r.signalled == "REJECT" for r in defective)
        false_rejects = sum(r.signalled == "REJECT" for r in good)
        lines.append(f"ground truth defects rejected {caught}/{len(defective)}, "
                     f"good parts rejected {false_rejects}/{len(good)}")
    if stats.alarms:
        lines.append("alarms       " + "; ".join(stats.alarms[-5:]))
    lines.append(f"ledger       {line.storage / 'ledger.sqlite'}")
    return "\n".join(lines)
