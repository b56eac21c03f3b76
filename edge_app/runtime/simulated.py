"""The embedded default: a simulated line. Synthetic parts on a replayed conveyor, inspected by the full
runtime, signalled over a real ZeroMQ link to an in-process PLC simulator; ground truth is known, so the
summary also says how many defects were caught and how many good parts were rejected.

The 2D+3D variant (``musc-edge run --3d``) replays synthetic scanned parts (RGB + organised cloud, MVTec 3D-AD
layout) through a ``2d+3d`` recipe; its summary breaks the catches down by defect kind, whose visibility
differs per modality (``musc_edge.edge.synthetic3d.DEFECT_MODALITY``)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..config import parse_config
from ..plc_sim import PlcSimulator
from ..sources.replay import paired_cloud
from ..synthetic import generate_set
from ..synthetic3d import generate_set as generate_scans
from ..synthetic3d import write_mvtec3d
from .inspector import Inspector
from .line import Line
from .recipes.recipe_scan import REFERENCE_SIZE
from .seed import seed_pool

SCAN_PATTERN, CLOUD_PATH = "*/rgb/*.png", "../xyz/{stem}.tiff"   # MVTec 3D-AD: test/<kind>/{rgb,xyz}/NNN.*


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
    truth = {str(p): p.parent.name for p in (line_parts / "test").glob("*/*.png")}
    print(summarise(line, stats, plc_counters, truth))
    return 0 if stats.parts == parts and plc_counters.received == parts else 1


def scan_line_config(plc_address: str, conveyor: Path, storage: Path, *, rate: float = 1.0, seed: int = 0,
                     size: int = REFERENCE_SIZE, model: Path | None = None) -> dict:
    """Config of a simulated 2D+3D line replaying an MVTec 3D-AD ``test`` folder.

    Groups keep MuSc-V2's area per group at any grid: 1024 groups of 128 points at 224 px, a quarter of
    each at 112 px.
    """
    area = (size / REFERENCE_SIZE) ** 2
    raw = {
        "line": {"name": "simulated-2d3d", "deadline_ms": 3000, "queue_size": 4},
        "model": {"size": size},
        "recipes": {"default": {"threshold": 1.0, "modality": "2d+3d",
                                "pool": {"capacity": 20, "min_size": 8},
                                # the synthetic parts ride a rail, always the same way up: the whole
                                # frame compares them better than a canonical view re-fitted per part
                                "scan": {"pose": "none", "n_groups": max(8, round(1024 * area)),
                                         "group_size": max(8, round(128 * area)),
                                         "normal_neighbours": 16 if size >= REFERENCE_SIZE else 8}}},
        "source": {"type": "replay", "path": str(conveyor), "pattern": SCAN_PATTERN, "cloud_path": CLOUD_PATH,
                   "rate": rate, "shuffle": True, "seed": seed, "recipe": "default"},
        "link": {"type": "zmq", "endpoint": plc_address, "heartbeat_interval_s": 0.5},
        "storage": {"dir": str(storage)},
    }
    if model:
        raw["model"]["path"] = str(model)
    return raw


def run_simulated_scan_line(workdir: Path | None = None, parts: int = 40, rate: float = 1.0, seed: int = 0,
                            model: Path | None = None, size: int = REFERENCE_SIZE) -> int:
    """Run the simulated 2D+3D line end to end and print its summary; returns a process exit code."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="musc-line3d-"))
    conveyor = write_mvtec3d(generate_scans(parts, seed=seed + 1, defect_fraction=0.25, size=size),
                             workdir / "conveyor") / "test"
    recent = write_mvtec3d(generate_scans(16, seed=seed + 2, defect_fraction=0.1, size=size),
                           workdir / "recent") / "test"
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*", log_path=workdir / "plc.jsonl") as plc:
        config = parse_config(scan_line_config(plc.address, conveyor, workdir / "line", rate=rate, seed=seed,
                                               size=size, model=model), "simulated 2D+3D line")
        inspector = Inspector(config)
        print(f"simulated 2D+3D line in {workdir}: {parts} scanned parts at {rate}/s, PLC simulator on "
              f"{plc.address}", file=sys.stderr)
        scans = [(p, paired_cloud(p, CLOUD_PATH)) for p in sorted(recent.glob(SCAN_PATTERN))]
        pool = inspector.recipes["default"].seed(inspector.recipes["default"].read_scans(scans))
        print(f"pool seeded from {pool} recent unlabeled scans", file=sys.stderr)
        line = Line(config, inspector=inspector, status=_status_printer())
        stats = line.run()
        plc_counters = plc.counters()
    print(file=sys.stderr)
    truth = {str(p): p.parent.parent.name for p in conveyor.glob(SCAN_PATTERN)}
    print(summarise(line, stats, plc_counters, truth, by_kind=True))
    return 0 if stats.parts == parts and plc_counters.received == parts else 1


def summarise(line: Line, stats, plc_counters, truth: dict[str, str] | None = None, by_kind: bool = False) -> str:
    """The final summary: parts, verdicts, acknowledgements, latency percentiles; with ``truth`` (defect
    kind by source path, "good" for good parts) the catches, per kind too with ``by_kind``."""
    lines = [f"parts        {stats.parts}",
             f"verdicts     ACCEPT {stats.by_verdict['ACCEPT']}  REJECT {stats.by_verdict['REJECT']}  "
             f"NO_VERDICT {stats.by_verdict['NO_VERDICT']}"
             + (f" ({', '.join(f'{k} {v}' for k, v in sorted(stats.by_reason.items()))})" if stats.by_reason else ""),
             f"PLC          received {plc_counters.received}  duplicates {plc_counters.duplicates}  "
             f"heartbeats {plc_counters.heartbeats}  acked by runtime {stats.acked} (late {stats.late_acks})"]
    for stage in ("decode", "features", "scoring", "link", "wait", "total"):   # wait: for look-ahead parts
        p = stats.percentiles(stats.stages[stage])
        if p:
            lines.append(f"{stage:<12} min {p['min']:6.1f}  p50 {p['p50']:6.1f}  p99 {p['p99']:6.1f}  "
                         f"max {p['max']:6.1f} ms")
    if truth:
        rows = line.ledger_rows()
        defective = [r for r in rows if truth.get(r.source_ref or "", "good") != "good"]
        good = [r for r in rows if truth.get(r.source_ref or "", "good") == "good"]
        caught = sum(r.signalled == "REJECT" for r in defective)
        false_rejects = sum(r.signalled == "REJECT" for r in good)
        lines.append(f"ground truth defects rejected {caught}/{len(defective)}, "
                     f"good parts rejected {false_rejects}/{len(good)}")
        if by_kind:
            kinds = sorted({truth[r.source_ref] for r in defective})
            lines.append("rejected by kind  " + "  ".join(
                f"{kind} {sum(r.signalled == 'REJECT' for r in defective if truth[r.source_ref] == kind)}/"
                f"{sum(truth[r.source_ref] == kind for r in defective)}" for kind in kinds))
    if stats.alarms:
        lines.append("alarms       " + "; ".join(list(stats.alarms)[-5:]))
    lines.append(f"ledger       {line.storage / 'ledger.sqlite'}")
    return "\n".join(lines)
