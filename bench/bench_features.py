"""Per-part cost of features + scoring at 224 px, pool 40, default blocks: today's fp32 path against the cut,
INT8 and ONNX-scoring paths, all measured in the same run and printed as ratios (this machine is shared and
its absolute times move from run to run; the ratios do not).

Baselines, measured first, in this run:
- the fp32 GEMM peak of this machine (numpy/BLAS, large square matrices, best of several);
- today's fp32 path: the full 12-block model (``models/dinov2_vits14_musc.onnx``) + numpy MSM.
Stages are timed interleaved (one call of each per round) so load changes hit every variant alike.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Multiply-accumulates per image at 224 px (ViT-S/14: 257 tokens, D=384): 12 T D^2 + 2 T^2 D per block.
MAC_PER_BLOCK = 12 * 257 * 384**2 + 2 * 257**2 * 384


def fp32_peak_gflops(n: int = 1024, repeat: int = 7) -> float:
    """Best fp32 GEMM rate of numpy's BLAS here (GFLOP/s), the ceiling every fp32 figure is compared to."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def interleaved(fns: dict[str, callable], repeat: int) -> dict[str, np.ndarray]:
    """Milliseconds per call of each function, one call of each per round (after one warm-up round)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: np.array(t) * 1e3 for name, t in times.items()}


def sample_image() -> np.ndarray:
    """A real bottle image when the shared data is there (900 x 900), else seeded noise of that size."""
    import cv2

    found = sorted((ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test" / "good").glob("*.png"))
    if not found:
        return np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8)
    return cv2.cvtColor(cv2.imread(str(found[0])), cv2.COLOR_BGR2RGB)


def feature_runs(models: dict[str, tuple[Path, bool]], size: int) -> dict[str, callable]:
    """One call per model: ``{name: (path, fold the position-embedding resize)}``."""
    from musc_edge.edge.features import FeatureEngine

    image = sample_image()
    return {name: (lambda e=FeatureEngine(path, size=size, fold_resizes=fold): e([image]))
            for name, (path, fold) in models.items()}


def scoring_runs(pool_size: int, n_sets: int, patches: int = 256, dim: int = 384) -> dict[str, callable]:
    from musc_edge.edge.pool import FeaturePool
    from musc_edge.edge.scoring import MuscParams
    from musc_edge.edge.scoring.onnx_msm import BACKENDS

    rng = np.random.default_rng(0)
    unit = lambda: (lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32))(
        rng.normal(size=(patches, dim)))
    members = [[unit() for _ in range(n_sets)] for _ in range(pool_size)]
    query = [unit() for _ in range(n_sets)]
    params = MuscParams()
    runs = {}
    for backend in BACKENDS:
        pool = FeaturePool(pool_size, n_sets, patches, dim, min_size=2, scorer=backend)
        for i, m in enumerate(members):
            pool.admit(str(i), m, 0.1 + 0.001 * i, m[0][0])
        runs[backend] = (lambda p=pool: p.score(query, (16, 16), params))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--today", type=Path, default=ROOT / "models" / "dinov2_vits14_musc.onnx",
                        help="today's fp32 model (all 12 blocks)")
    parser.add_argument("--cut", type=Path, default=ROOT / "models" / "dinov2_vits14_musc_cut.onnx")
    parser.add_argument("--int8", type=Path, default=ROOT / "models" / "dinov2_vits14_musc_cut_int8.onnx")
    parser.add_argument("--pool", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    from musc_edge.edge.manifest import load_manifest

    peak = fp32_peak_gflops()
    # "today": the fp32 path as the issue measured it, the file run as exported (the position embedding
    # resized on every inference); the others fold that resize at load, as the runtime does now.
    models = {"fp32 12 blocks (today)": (args.today, False), "fp32 cut, unfolded": (args.cut, False),
              "fp32 cut": (args.cut, True), "int8 cut, unfolded": (args.int8, False), "int8 cut": (args.int8, True)}
    models = {name: spec for name, spec in models.items() if spec[0].is_file()}
    feats = interleaved(feature_runs(models, 224), args.repeat)
    scores = interleaved(scoring_runs(args.pool, 2), args.repeat)
    peak_after = fp32_peak_gflops()
    print(f"fp32 GEMM peak of this machine: {peak:.0f} GFLOP/s (start), {peak_after:.0f} GFLOP/s (end); "
          f"the higher one is the baseline")
    peak = max(peak, peak_after)

    def row(name: str, ms: np.ndarray, macs: float, base: float) -> str:
        p50 = float(np.median(ms))
        rate = 2 * macs / (p50 / 1e3) / 1e9
        return f"{name:<34} {p50:8.1f} {float(np.percentile(ms, 90)):8.1f} {100 * rate / peak:9.0f} % {base / p50:8.2f}x"

    print(f"\nper part at 224 px, blocks 6+9, pool {args.pool} ({args.repeat} interleaved rounds)")
    print(f"{'stage':<34} {'p50 ms':>8} {'p90 ms':>8} {'of fp32 peak':>11} {'speed-up':>9}")
    today_f = float(np.median(feats[next(iter(models))]))
    for name, ms in feats.items():
        blocks = load_manifest(models[name][0], check_hash=False).cut_block or 12
        print(row(f"features {name}", ms, blocks * MAC_PER_BLOCK, today_f))
    today_s = float(np.median(scores["numpy"]))
    for name, ms in scores.items():
        print(row(f"scoring {name}", ms, 2 * args.pool * 256 * 256 * 384, today_s))
    best_f = min(feats, key=lambda k: np.median(feats[k]))
    best_s = min(scores, key=lambda k: np.median(scores[k]))
    exact_s = min(("numpy", "onnx-fp32"), key=lambda k: np.median(scores[k]))
    total_today = today_f + today_s
    print(f"\nfeatures + scoring, today (fp32 12 blocks + numpy): {total_today:.1f} ms")
    for label, f, s in (("cut fp32 + exact scoring", "fp32 cut", exact_s), ("fastest", best_f, best_s)):
        if f in feats:
            total = float(np.median(feats[f])) + float(np.median(scores[s]))
            print(f"  {label:<26} ({f} + {s}): {total:.1f} ms = {total_today / total:.2f}x faster")


if __name__ == "__main__":
    main()
