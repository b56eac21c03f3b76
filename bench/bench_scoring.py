"""Hot-path timings of the 2D scoring core for one part (prints figures; asserts nothing).

Per part on the line: SNAMD aggregation of each layer, then one-vs-pool MSM against a full pool, then
streaming RsCon. Shapes follow the default model (ViT-S/14: D=384) at 224 px (16x16 grid) and 448 px.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from edge_app.pool import FeaturePool
from edge_app.scoring import MuscParams, l2_normalise, prepare


def timeit(fn, repeat: int) -> np.ndarray:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1e3


def bench(grid: int, layers: int, pool_size: int, repeat: int, dim: int = 384) -> None:
    rng = np.random.default_rng(0)
    params = MuscParams(salient_layer=min(1, layers - 1))
    tokens = [rng.normal(size=(1, grid * grid, dim)).astype(np.float32) * 3 for _ in range(layers)]
    sets = prepare(tokens, (grid, grid), params)
    pool = FeaturePool(pool_size, layers, grid * grid, dim, min_size=2)
    for i in range(pool_size):
        member = [l2_normalise(rng.normal(size=(grid * grid, dim))).astype(np.float32) for _ in range(layers)]
        pool.admit(f"p{i}", member, 0.1 + 0.01 * rng.random(), member[0][0])
    query = [fs[0] for fs in sets]
    t_agg = timeit(lambda: prepare(tokens, (grid, grid), params), repeat)
    t_msm = timeit(lambda: pool.score(query, (grid, grid), params), repeat)
    print(f"grid {grid:>2}x{grid:<2} layers {layers} pool {pool_size:>3} | "
          f"SNAMD p50 {np.median(t_agg):7.2f} ms | one-vs-pool MSM+RsCon p50 {np.median(t_msm):7.2f} ms "
          f"p99 {np.percentile(t_msm, 99):7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print("scoring hot path, one part (numpy on CPU)")
    for grid, layers, pool in [(16, 2, 40), (16, 4, 40), (16, 2, 100), (16, 2, 200), (32, 2, 40)]:
        bench(grid, layers, pool, args.repeat if grid == 16 else max(3, args.repeat // 4))


if __name__ == "__main__":
    main()
