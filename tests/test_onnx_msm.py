"""The ONNX Runtime MSM graph against the numpy reference, on a real FeaturePool."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.pool import FeaturePool
from musc_edge.edge.scoring import l2_normalise
from musc_edge.edge.scoring.msm import interval_k
from musc_edge.edge.scoring.onnx_msm import PoolScorer, numpy_score, quantize_rows

P, D = 16, 32


def _member(rng, n_sets=2):
    return [l2_normalise(rng.normal(size=(P, D))).astype(np.float32) for _ in range(n_sets)]


def _pool(rng, capacity=6, size=6):
    pool = FeaturePool(capacity, 2, P, D, min_size=2)
    for i in range(size):
        member = _member(rng)
        pool.admit(f"p{i}", member, 0.1, member[0][0])
    return pool


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("int8", 2e-2)])
def test_graph_matches_numpy_reference(precision, tol):
    rng = np.random.default_rng(0)
    pool = _pool(rng, capacity=6, size=4)          # not full: refs are a strided view
    scorer = PoolScorer(2, P, D, pool.capacity, precision)
    for _ in range(4):                              # admissions and evictions between parts are mirrored
        query = _member(rng)
        k = interval_k(pool.size, 0.3)
        ours, ref = scorer.score(query, pool, k), numpy_score(query, pool, k)
        assert ours.patch.shape == (P,) and [d.shape for d in ours.dists] == [(P, pool.size)] * 2
        np.testing.assert_allclose(ours.patch, ref.patch, atol=tol)
        for a, b in zip(ours.dists, ref.dists):
            np.testing.assert_allclose(a, b, atol=tol)
        pool.admit(f"q{_}", query, 0.1, query[0][0])


def test_int8_keeps_which_patch_is_nearest_for_a_near_duplicate():
    rng = np.random.default_rng(1)
    pool = _pool(rng)
    twin = [l2_normalise(pool.work[s, 2 * P:3 * P] + 0.01 * rng.normal(size=(P, D))).astype(np.float32)
            for s in range(2)]
    dists = PoolScorer(2, P, D, pool.capacity, "int8").score(twin, pool, 1).dists
    assert all(int(np.argmin(d.mean(axis=0))) == 2 for d in dists)


def test_quantize_rows_round_trip():
    x = l2_normalise(np.random.default_rng(2).normal(size=(50, 384))).astype(np.float32)
    values, scale = quantize_rows(x)
    assert values.dtype == np.int8 and np.abs(values).max() == 127
    assert np.abs(values * scale[:, None] - x).max() <= scale.max() / 2 + 1e-7
    shifted, _ = quantize_rows(x, zero_point=128)
    assert shifted.dtype == np.uint8 and np.array_equal(shifted.astype(int) - 128, values)


@pytest.mark.parametrize("backend, tol", [("onnx-fp32", 1e-5), ("onnx-int8", 2e-2)])
def test_pool_scores_the_same_through_any_backend(backend, tol):
    from musc_edge.edge.scoring import MuscParams

    rng = np.random.default_rng(3)
    pools = {name: FeaturePool(8, 2, P, D, min_size=3, scorer=name) for name in ("numpy", backend)}
    for i in range(8):
        member = _member(rng)
        for pool in pools.values():
            pool.admit(f"p{i}", member, 0.1 + 0.01 * i, member[0][0])
    params = MuscParams()
    query = _member(rng)
    for exclude in (None, "p3"):  # the graph's fused interval mean, and numpy's over the kept members
        ref, ours = (pool.score(query, (4, 4), params, exclude_part_id=exclude) for pool in pools.values())
        assert ours.n_refs == ref.n_refs == (8 if exclude is None else 7)
        np.testing.assert_allclose(ours.patch_map, ref.patch_map, atol=tol)
        assert abs(ours.raw - ref.raw) <= tol and abs(ours.nearest - ref.nearest) <= tol


def test_auto_backend_is_timed_and_chosen_once():
    from musc_edge.edge.scoring.onnx_msm import EXACT_BACKENDS, choose_backend

    name, times = choose_backend(2, P, D, 4, repeat=2)
    assert name in EXACT_BACKENDS and set(times) == set(EXACT_BACKENDS) and name == min(times, key=times.get)
    assert choose_backend(2, P, D, 4, repeat=2) == (name, times)
    assert FeaturePool(4, 2, P, D, min_size=2, scorer="auto").scorer_name == name


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="scoring backend"):
        FeaturePool(4, 2, P, D, min_size=2, scorer="cuda-magic")
