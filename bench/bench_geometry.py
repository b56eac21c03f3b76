"""Per-part cost of aspect-preserving input on the line (prints figures; asserts nothing).

Cutting a frame into model windows (resize + crops) and stitching the windows' patch maps back, against the
old square resize, for a square frame and a tall 1:2.5 frame (KolektorSDD-like) at 224 px. One-vs-pool
scoring cost grows with the windows (patches per part); see bench_scoring.py for that.
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np

from musc_edge.edge.geometry import plan_input, stitch, windows


def timeit(fn, repeat: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'frame':>12} {'fit':>7} {'windows':>8} {'cut ms':>8} {'stitch ms':>10} {'squash ms':>10}")
    for shape in [(900, 900), (1250, 500)]:
        frame = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
        squash = timeit(lambda: cv2.resize(frame, (args.size, args.size), interpolation=cv2.INTER_CUBIC),
                        args.repeat)
        for fit in ("tile", "pad"):
            plan = plan_input(shape, args.size, 14, fit)
            t = args.size // 14
            maps = rng.random((plan.n_windows, t, t)).astype(np.float32)
            cut = timeit(lambda: windows(frame, plan), args.repeat)
            back = timeit(lambda: stitch(maps, plan), args.repeat)
            print(f"{shape[0]:>5}x{shape[1]:<6} {fit:>7} {plan.n_windows:>8} {cut:8.2f} {back:10.3f} {squash:10.2f}")


if __name__ == "__main__":
    main()
