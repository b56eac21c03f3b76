"""Recurring-defect benchmark: does a defect that repeats teach the pool that it is normal, and does the pool
guard (edge_app/runtime/pool_guard.py) stop it?

The MVTec AD bottle good images (train/good + test/good) in a seeded shuffled order are a line; from part
``--onset`` on, ``--share`` of the parts carry ONE recurring defect: the defect of one test image (its
ground-truth region, widened and feathered) pasted at the same place on good bottles never seen on the line,
with a small seeded shift and brightness change each time -- what a damaged guide rail does. At part
``--onset`` the threshold is calibrated label-free from the scores so far (target false-reject rate
``--target-frr``), as a technician would before the damage starts.

Every part goes through the runtime's Inspector (inspect, then admit) with and without the guard. Printed:
recall on the recurring defect (all, and its first and second half), false-reject rate on the good parts
after the onset, at which part the alarm fired, look-alikes that became pool members. Then the normal
bottle line (all train/good + test images, seeded shuffle, as bench/bench_line.py, no injection) with and
without the guard: alarms (none expected), image AUROC of the test images and verdicts that differ.

Features are computed once per image and reused by all runs (the runs differ only in pool and verdicts).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from musc_edge.calibration.thresholds import fit_threshold
from musc_edge.edge.config import parse_config
from musc_edge.edge.evaluation.datasets import read_image
from musc_edge.edge.record import PartRecord
from musc_edge.edge.runtime.inspector import Inspector

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class StreamPart:
    part_id: str
    kind: str             # good | recurring | <MVTec defect type> (normal line)
    image: np.ndarray
    ref: str


# -- the streams ---------------------------------------------------------------------------------------------
def paste_defect(base: np.ndarray, defect: np.ndarray, alpha: np.ndarray, shift: tuple[int, int],
                 gain: float) -> np.ndarray:
    """``defect``'s region (soft mask ``alpha`` in 0..1) moved by ``shift`` pixels and scaled in brightness by
    ``gain``, pasted on ``base`` at the same place."""
    h, w = base.shape[:2]
    move = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    patch = cv2.warpAffine(defect, move, (w, h), borderMode=cv2.BORDER_REFLECT).astype(np.float32) * gain
    a = cv2.warpAffine(alpha, move, (w, h))[..., None]
    return np.clip(base * (1 - a) + patch * a, 0, 255).astype(np.uint8)


def soft_mask(mask: np.ndarray, widen_px: int = 12, feather_px: float = 6.0) -> np.ndarray:
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * widen_px + 1,) * 2, np.uint8)).astype(np.float32)
    return cv2.GaussianBlur(grown, (0, 0), feather_px)


def recurring_stream(bottle: Path, defect: str, source: str, onset: int, share: float,
                     seed: int) -> list[StreamPart]:
    """Good bottles; from ``onset`` on, ``share`` of the parts are look-alikes of one defect on unseen bottles."""
    goods = sorted([*bottle.glob("train/good/*.png"), *bottle.glob("test/good/*.png")])
    rng = np.random.default_rng(seed)
    goods = [goods[i] for i in rng.permutation(len(goods))]
    after = len(goods) - onset
    n_recurring = round(after * share)            # each look-alike consumes one good bottle as its base
    line, bases = goods[:len(goods) - n_recurring], goods[len(goods) - n_recurring:]
    positions = set((onset + rng.choice(after, n_recurring, replace=False)).tolist())
    image_path = bottle / "test" / defect / f"{source}.png"
    defect_image = read_image(image_path)
    alpha = soft_mask(cv2.imread(str(bottle / "ground_truth" / defect / f"{source}_mask.png"), 0) > 0)
    stream, line_iter, base_iter = [], iter(line), iter(bases)
    for i in range(len(goods)):
        if i in positions:
            base = next(base_iter)
            shift = tuple(int(v) for v in rng.integers(-6, 7, 2))
            image = paste_defect(read_image(base), defect_image, alpha, shift, float(rng.uniform(0.95, 1.05)))
            stream.append(StreamPart(f"P{i:04d}", "recurring", image, f"{image_path.name} on {base.name}"))
        else:
            path = next(line_iter)
            stream.append(StreamPart(f"P{i:04d}", "good", read_image(path), str(path)))
    return stream


def normal_stream(bottle: Path, seed: int) -> list[StreamPart]:
    """The bottle line of bench/bench_line.py: every train/good and test image, seeded shuffle."""
    paths = sorted([*bottle.glob("train/good/*.png"), *bottle.glob("test/*/*.png")])
    order = np.random.default_rng(seed).permutation(len(paths))
    return [StreamPart(f"P{i:04d}", paths[j].parent.name if "/test/" in str(paths[j]) else "good",
                       read_image(paths[j]), str(paths[j])) for i, j in enumerate(order)]


# -- running -------------------------------------------------------------------------------------------------
class FeatureCache:
    """The inspector's feature stage, computed once per distinct image (float16, as pools store them)."""

    def __init__(self):
        self.sets: dict[bytes, list[np.ndarray]] = {}
        self.computed = 0

    @classmethod
    def load(cls, path: Path) -> "FeatureCache":
        cache = cls()
        with np.load(path) as data:
            keys = {name.split("_")[0] for name in data.files}
            n_sets = len(data.files) // max(len(keys), 1)
            for key in keys:
                cache.sets[bytes.fromhex(key)] = [data[f"{key}_{s}"] for s in range(n_sets)]
        return cache

    def save(self, path: Path) -> None:
        np.savez(path, **{f"{key.hex()}_{s}": fs for key, sets in self.sets.items() for s, fs in enumerate(sets)})

    def wrap(self, features):
        def cached(images: list[np.ndarray]) -> list[list[np.ndarray]]:
            out = []
            for image in images:
                key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
                if key not in self.sets:
                    self.sets[key] = [s.astype(np.float16) for s in features([image])[0]]
                    self.computed += 1
                out.append([s.astype(np.float32) for s in self.sets[key]])
            return out
        return cached


def make_inspector(model: Path, pool: int, guard: dict, engine=None) -> Inspector:
    config = parse_config({
        "model": {"path": str(model), "size": 224, "blocks": [6, 9]},
        "recipes": {"default": {"pool": {"capacity": pool, "min_size": 10}, "guard": guard}},
        "source": {"type": "replay", "paths": ["unused.png"]},
        "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:1"},
        "storage": {"dir": "/tmp/bench_recurring"}}, "bench_recurring")
    return Inspector(config, engine)


def run_stream(inspector: Inspector, cache: FeatureCache, stream: list[StreamPart], onset: int,
               threshold: float | None, target_frr: float, label: str) -> dict:
    """Inspect and admit every part; at ``onset`` set ``threshold`` (or calibrate one label-free)."""
    rp = inspector.recipes["default"]
    rp.scoring = replace(rp.scoring, features=cache.wrap(rp.scoring.features))
    alarms: list[tuple[int, str]] = []
    now = {"i": 0}
    inspector.on_alarm = lambda text: alarms.append((now["i"], text))
    rows, in_pool_max, t0 = [], 0, time.monotonic()
    for i, sp in enumerate(stream):
        now["i"] = i
        if i == onset:
            if threshold is None:
                scores = np.array([r["score"] for r in rows if r["score"] is not None])
                threshold = fit_threshold(scores, target_frr).threshold
            rp.threshold = threshold
        part = PartRecord(part_id=sp.part_id, recipe="default", capture_time=float(i), image=sp.image,
                          source_ref=sp.ref)
        part, prepared = inspector.inspect(part)
        admitted = inspector.admit(part, prepared, now=float(i))
        rows.append({"kind": sp.kind, "verdict": part.verdict.value, "score": part.score, "admitted": admitted})
        members = rp.pool.part_ids[:rp.pool.size]
        in_pool_max = max(in_pool_max, sum(stream[int(m[1:])].kind == "recurring" for m in members))
        if (i + 1) % 50 == 0:
            print(f"  {label}: {i + 1}/{len(stream)} parts, {time.monotonic() - t0:.0f} s", file=sys.stderr)
    stats = rp.guard.stats
    return {"rows": rows, "alarms": alarms, "threshold": threshold,
            "refused": {"lookalikes": stats.refused_lookalikes, "atypical": stats.refused_atypical},
            "recurring_in_pool_max": in_pool_max, "wall_s": time.monotonic() - t0}


def rate(rows: list[dict], kind_is, verdict: str = "REJECT") -> float | None:
    chosen = [r for r in rows if kind_is(r["kind"]) and r["verdict"] in ("ACCEPT", "REJECT")]
    return round(100 * sum(r["verdict"] == verdict for r in chosen) / len(chosen), 1) if chosen else None


def recurring_figures(run: dict, onset: int) -> dict:
    rows = run["rows"]
    rec = [r for r in rows if r["kind"] == "recurring"]
    half = len(rec) // 2
    first_alarm = run["alarms"][0][0] if run["alarms"] else None
    seen = sum(r["kind"] == "recurring" for r in rows[:first_alarm + 1]) if first_alarm is not None else None
    return {"threshold": round(run["threshold"], 3), "recurring_parts": len(rec),
            "recall": rate(rec, lambda k: True), "recall_first_half": rate(rec[:half], lambda k: True),
            "recall_second_half": rate(rec[half:], lambda k: True),
            "false_reject_rate_after_onset": rate(rows[onset:], lambda k: k == "good"),
            "false_reject_rate_before_onset": rate(rows[:onset], lambda k: k == "good"),
            "alarm_part": first_alarm, "recurring_parts_before_alarm": seen,
            "alarm": run["alarms"][0][1] if run["alarms"] else None, "alarms": len(run["alarms"]),
            "refused_admissions": run["refused"], "recurring_members_in_pool_max": run["recurring_in_pool_max"]}


def normal_figures(run: dict, stream: list[StreamPart]) -> dict:
    rows = run["rows"]
    test = [(r, sp) for r, sp in zip(rows, stream) if "/test/" in sp.ref and r["score"] is not None]
    labels = [int(sp.kind != "good") for _, sp in test]
    return {"threshold": round(run["threshold"], 3), "alarms": [text for _, text in run["alarms"]],
            "test_image_auroc": round(100 * roc_auc_score(labels, [r["score"] for r, _ in test]), 2),
            "false_reject_rate": rate(rows, lambda k: k == "good"),
            "defect_recall": rate(rows, lambda k: k != "good"), "refused_admissions": run["refused"]}


def verdicts_differ(a: dict, b: dict) -> int:
    return sum(x["verdict"] != y["verdict"] for x, y in zip(a["rows"], b["rows"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "dinov2_vits14_musc.onnx")
    parser.add_argument("--defect", default="contamination", help="MVTec AD bottle defect type")
    parser.add_argument("--source", default="001", help="the test image of that type whose defect recurs")
    parser.add_argument("--onset", type=int, default=100, help="first part that may carry the defect")
    parser.add_argument("--share", type=float, default=0.3, help="share of parts with the defect after the onset")
    parser.add_argument("--pool", type=int, default=40)
    parser.add_argument("--threshold", type=float, help="threshold from the onset on (default: calibrated "
                        "label-free at the onset, as `musc-calibrate threshold suggest`)")
    parser.add_argument("--target-frr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guard", action="append", default=[], metavar="KEY=VALUE",
                        help="a pool guard setting (recipes.*.guard in the line config) for the guarded runs")
    parser.add_argument("--skip-normal", action="store_true", help="only the recurring-defect runs")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--cache", type=Path, help="keep computed features in this file (reruns skip the model)")
    args = parser.parse_args()
    bottle = args.data / "mvtec_ad" / "bottle"
    if not bottle.is_dir():
        sys.exit(f"bench_recurring: no data at {bottle}")
    cache = FeatureCache.load(args.cache) if args.cache and args.cache.is_file() else FeatureCache()
    off_settings = {"enabled": False}
    on_settings = {"enabled": True, **{k: yaml.safe_load(v) for k, v in (g.split("=", 1) for g in args.guard)}}
    engine = make_inspector(args.model, args.pool, off_settings).engine
    t0 = time.monotonic()
    stream = recurring_stream(bottle, args.defect, args.source, args.onset, args.share, args.seed)
    off = run_stream(make_inspector(args.model, args.pool, off_settings, engine), cache, stream, args.onset,
                     args.threshold, args.target_frr, "recurring, no guard")
    on = run_stream(make_inspector(args.model, args.pool, on_settings, engine), cache, stream, args.onset,
                    off["threshold"], args.target_frr, "recurring, guard")
    results = {"stream": {"parts": len(stream), "onset": args.onset, "share": args.share, "defect": args.defect,
                          "source": args.source, "pool": args.pool, "seed": args.seed},
               "guard_settings": on_settings,
               "recurring": {"no_guard": recurring_figures(off, args.onset),
                             "guard": recurring_figures(on, args.onset)}}
    if not args.skip_normal:
        normal = normal_stream(bottle, args.seed)
        n_off = run_stream(make_inspector(args.model, args.pool, off_settings, engine), cache, normal, args.onset,
                           args.threshold, args.target_frr, "normal line, no guard")
        n_on = run_stream(make_inspector(args.model, args.pool, on_settings, engine), cache, normal, args.onset,
                          n_off["threshold"], args.target_frr, "normal line, guard")
        results["normal"] = {"parts": len(normal), "no_guard": normal_figures(n_off, normal),
                             "guard": normal_figures(n_on, normal), "verdicts_differ": verdicts_differ(n_off, n_on)}
    if args.cache:
        cache.save(args.cache)
    results["guard_wall_ratio"] = round(on["wall_s"] / off["wall_s"], 2)
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["images_featured"] = cache.computed
    print_results(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_results(r: dict) -> None:
    s = r["stream"]
    print(f"\n== recurring defect: bottle, {s['parts']} parts, {s['defect']}/{s['source']} on "
          f"{100 * s['share']:.0f} % of parts from part {s['onset']}, pool {s['pool']}, seed {s['seed']}")
    print(f"{'':<10} {'threshold':>9} {'recall':>7} {'1st half':>8} {'2nd half':>8} {'FRR':>6} "
          f"{'alarm at':>8} {'refused':>7} {'in pool':>7}")
    for name, f in r["recurring"].items():
        print(f"{name:<10} {f['threshold']:9.3f} {f['recall']:7.1f} {f['recall_first_half']:8.1f} "
              f"{f['recall_second_half']:8.1f} {f['false_reject_rate_after_onset']:6.1f} "
              f"{str(f['alarm_part']):>8} {sum(f['refused_admissions'].values()):7d} "
              f"{f['recurring_members_in_pool_max']:7d}")
    guard = r["recurring"]["guard"]
    if guard["alarm"]:
        print(f"alarm at part {guard['alarm_part']} (after {guard['recurring_parts_before_alarm']} recurring "
              f"parts): {guard['alarm']}")
    if "normal" in r:
        n = r["normal"]
        print(f"\n== normal bottle line: {n['parts']} parts, no injection")
        for name in ("no_guard", "guard"):
            f = n[name]
            print(f"{name:<10} threshold {f['threshold']:.3f}  test image AUROC {f['test_image_auroc']}  FRR "
                  f"{f['false_reject_rate']} %  defect recall {f['defect_recall']} %  refused {f['refused_admissions']}"
                  f"  alarms {len(f['alarms'])}")
        print(f"verdicts that differ with the guard: {n['verdicts_differ']} of {n['parts']}")
    print(f"\n{r['images_featured']} images featured once, {r['wall_s']} s; recurring run with / without the guard "
          f"(cached features: scoring, admission, guard): {r['guard_wall_ratio']} x the time")


if __name__ == "__main__":
    main()
