"""The line benchmark: MVTec AD bottle (all train/good + test images, seeded shuffle) replayed as a conveyor
through the full runtime, signalled to the PLC simulator over a serial pty pair and/or ZeroMQ on 127.0.0.1.

Prints per-stage latency percentiles (decode, features, scoring, link), checks that every part has exactly
one ledger row and one acknowledged message, and measures the image AUROC of the streamed scores over the
test images. ``--find-rate`` also searches the highest rate this machine sustains with no NO_VERDICT.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sklearn.metrics import roc_auc_score

from edge_app.config import parse_config
from edge_app.plc_sim import PlcSimulator
from edge_app.record import Reason, Verdict
from edge_app.runtime.line import Line

ROOT = Path(__file__).resolve().parents[1]


def bottle_paths(data: Path) -> list[str]:
    root = data / "mvtec_ad" / "bottle"
    if not root.is_dir():
        sys.exit(f"bench_line: no data at {root}")
    return sorted(str(p) for p in [*root.glob("train/good/*.png"), *root.glob("test/*/*.png")])


def run(paths: list[str], link: str, rate: float, out: Path, threshold: float, pool: int, limit: int | None = None,
        quiet: bool = False, model: Path = ROOT / "models" / "dinov2_vits14_musc.onnx", precision: str = "fp32",
        scorer: str = "auto") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    sim = PlcSimulator.on_pty() if link == "serial" else PlcSimulator.on_zmq("tcp://127.0.0.1:*")
    with sim as plc:
        link_cfg = {"type": "serial", "url": plc.address} if link == "serial" else {"type": "zmq", "endpoint": plc.address}
        config = parse_config({
            "line": {"name": f"bottle-{link}", "deadline_ms": 1500, "queue_size": 4},
            "model": {"path": str(model), "size": 224, "blocks": [6, 9], "precision": precision},
            "scoring": {"backend": scorer},
            "recipes": {"default": {"threshold": threshold, "pool": {"capacity": pool, "min_size": 10}}},
            "source": {"type": "replay", "paths": paths, "rate": rate, "shuffle": True, "seed": 0,
                       **({"limit": limit} if limit else {})},
            "link": {**link_cfg, "heartbeat_interval_s": 1.0},
            "storage": {"dir": str(out), "archive": {"quota_mb": 200}},
        }, "bench_line")
        line = Line(config, status=None if quiet else (lambda text: print("  " + text, file=sys.stderr)))
        t0 = time.monotonic()
        stats = line.run()
        wall = time.monotonic() - t0
        received = sorted(v.seq for v in plc.received())
    rows = line.ledger_rows()
    n = limit or len(paths)
    test = [r for r in rows if "/test/" in (r.source_ref or "")]
    scored = [r for r in test if r.score is not None]
    labels = [int("/good/" not in r.source_ref) for r in scored]
    no_verdict = [r for r in rows if r.verdict == Verdict.NO_VERDICT and r.reason != Reason.WARMUP]
    result = {
        "link": link, "rate": rate, "parts": n, "ledger_rows": len(rows), "wall_s": round(wall, 1),
        "one_row_per_part": len(rows) == n and len({r.part_id for r in rows}) == n,
        "one_ack_per_part": all(r.acked for r in rows) and received == [r.seq for r in rows],
        "verdicts": {v.value: sum(r.verdict == v for r in rows) for v in Verdict},
        "no_verdict_after_warmup": {r.reason.label: sum(x.reason == r.reason for x in no_verdict) for r in no_verdict},
        "test_images": len(test), "test_scored": len(scored),
        "test_image_auroc": round(100 * roc_auc_score(labels, [r.score for r in scored]), 2) if len(set(labels)) == 2 else None,
        "latency_ms": {stage: stats.percentiles(stats.stages[stage]) for stage in stats.stages},
    }
    return result


def print_result(r: dict) -> None:
    print(f"\n== bottle line over {r['link']} at {r['rate']} parts/s: {r['parts']} parts in {r['wall_s']} s")
    print(f"ledger rows {r['ledger_rows']}  one row per part: {r['one_row_per_part']}  "
          f"one acked message per part: {r['one_ack_per_part']}")
    print(f"verdicts {r['verdicts']}  NO_VERDICT after warm-up {r['no_verdict_after_warmup'] or 'none'}")
    print(f"test images {r['test_images']} (scored {r['test_scored']}): image AUROC {r['test_image_auroc']}")
    print(f"{'stage':<9} {'min':>7} {'p50':>7} {'p99':>7} {'max':>7}  ms")
    for stage, p in r["latency_ms"].items():
        if p:
            print(f"{stage:<9} {p['min']:7.1f} {p['p50']:7.1f} {p['p99']:7.1f} {p['max']:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--link", choices=("serial", "zmq", "both"), default="both")
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--pool", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bottle_line"))
    parser.add_argument("--limit", type=int, help="only the first N parts of the shuffled stream")
    parser.add_argument("--find-rate", action="store_true", help="also find the highest rate with no NO_VERDICT")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "dinov2_vits14_musc.onnx",
                        help="feature model, or a folder to pick the --precision model covering blocks 6, 9 from")
    parser.add_argument("--precision", choices=("fp32", "int8", "fp16"), default="fp32")
    parser.add_argument("--scorer", choices=("auto", "numpy", "onnx-fp32", "onnx-int8"), default="auto")
    args = parser.parse_args()
    paths = bottle_paths(args.data)
    results = []
    for link in (("serial", "zmq") if args.link == "both" else (args.link,)):
        out = args.out if link == "serial" or args.link != "both" else args.out.with_name(args.out.name + "_zmq")
        results.append(run(paths, link, args.rate, out, args.threshold, args.pool, args.limit,
                           model=args.model, precision=args.precision, scorer=args.scorer))
        print_result(results[-1])
    if args.find_rate:
        rate, best = args.rate, None
        while rate <= 20:
            r = run(paths, "zmq", rate, args.out.with_name("rate_probe"), args.threshold, args.pool, limit=120, quiet=True,
                    model=args.model, precision=args.precision, scorer=args.scorer)
            ok = not r["no_verdict_after_warmup"]
            print(f"rate {rate:4.1f} parts/s: {'no NO_VERDICT' if ok else r['no_verdict_after_warmup']}")
            if not ok:
                break
            best, rate = rate, rate + 1.0
        print(f"highest sustained rate with no NO_VERDICT: {best} parts/s")
        results.append({"highest_rate": best})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
