"""Hot-path timings of the 2D scoring core for one part (prints figures; asserts nothing).

Per part on the line: SNAMD aggregation of each layer, then one-vs-pool MSM against a full pool, then
streaming RsCon. Shapes follow the default model (ViT-S/14: D=384) at 224 px (16x16 grid) and 448 px.
Every MSM backend (numpy, ONNX Runtime fp32 and INT8 graphs) is timed interleaved in the same run and shown
as a speed-up over numpy and as a share of this machine's fp32 GEMM peak, measured at the start.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench_features import fp32_peak_gflops, interleaved
from musc_edge.edge.pool import FeaturePool
from musc_edge.edge.scoring import MuscParams, l2_normalise, prepare
from musc_edge.edge.scoring.onnx_msm import BACKENDS


def bench(grid: int, layers: int, pool_size: int, repeat: int, peak: float, dim: int = 384) -> None:
    rng = np.random.default_rng(0)
    params = MuscParams(salient_layer=min(1, layers - 1))
    tokens = [rng.normal(size=(1, grid * grid, dim)).astype(np.float32) * 3 for _ in range(layers)]
    sets = prepare(tokens, (grid, grid), params)
    members = [[l2_normalise(rng.normal(size=(grid * grid, dim))).astype(np.float32) for _ in range(layers)]
               for _ in range(pool_size)]
    query = [fs[0] for fs in sets]
    runs = {"SNAMD": lambda: prepare(tokens, (grid, grid), params)}
    for backend in BACKENDS:
        pool = FeaturePool(pool_size, layers, grid * grid, dim, min_size=2, scorer=backend)
        for i, member in enumerate(members):
            pool.admit(f"p{i}", member, 0.1 + 0.01 * rng.random(), member[0][0])
        runs[backend] = lambda p=pool: p.score(query, (grid, grid), params)
    times = interleaved(runs, repeat)
    flops = 2 * layers * pool_size * (grid * grid) ** 2 * dim
    base = float(np.median(times["numpy"]))
    msm = " | ".join(f"{b} {np.median(times[b]):7.2f} ms {base / np.median(times[b]):4.2f}x "
                     f"{100 * flops / (np.median(times[b]) / 1e3) / 1e9 / peak:4.0f}%" for b in BACKENDS)
    print(f"grid {grid:>2}x{grid:<2} layers {layers} pool {pool_size:>3} | SNAMD {np.median(times['SNAMD']):6.2f} ms | "
          f"MSM+RsCon: {msm}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    peak = fp32_peak_gflops()
    print(f"scoring hot path, one part (CPU); fp32 GEMM peak {peak:.0f} GFLOP/s; per backend: p50, speed-up over "
          f"numpy, share of the fp32 peak")
    for grid, layers, pool in [(16, 2, 40), (16, 4, 40), (16, 2, 100), (16, 2, 200), (32, 2, 40)]:
        bench(grid, layers, pool, args.repeat if grid == 16 else max(3, args.repeat // 4), peak)


if __name__ == "__main__":
    main()
