"""The ONNX Runtime MSM graph against the numpy reference, on a real FeaturePool.

Tolerances come from the arithmetic, not from one machine: fp32 graphs differ from numpy only in the order of a
D-term sum (:func:`fp32_order_tolerance`); the INT8 graph must equal the integer product of the quantized
values exactly (up to fp32 rounding of the rescaling) and stay within the quantization bound of the fp32
distances (:func:`int8_distance_bound`). Which INT8 weights are exact depends on the CPU (VNNI/AMX or not):
the test that needs full 8-bit weights says so.
"""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.cpu_features import cpu_features
from musc_edge.edge.pool import FeaturePool
from musc_edge.edge.scoring import l2_normalise
from musc_edge.edge.scoring.msm import interval_k
from musc_edge.edge.scoring.onnx_msm import PoolScorer, numpy_score, quantize_rows

P, D = 16, 32
U32 = float(np.finfo(np.float32).eps) / 2     # unit roundoff of fp32
CPU = cpu_features()
needs_exact_8bit = pytest.mark.skipif(
    not CPU.int8_exact, reason=f"8-bit u8 x s8 products saturate in 16-bit lanes without VNNI/AMX ({CPU.summary()})")


def fp32_order_tolerance(terms: int, magnitude: float = 1.0) -> float:
    """Largest difference between two fp32 evaluations of one sum of ``terms`` products taken in different
    orders (numpy's BLAS vs ONNX Runtime's kernel): twice Higham's gamma_n bound, |sum| <= ``magnitude``
    (unit vectors: cosines), carried through dist = sqrt(2 - 2 cos) where dist >= 1/2 (random unit vectors)."""
    gamma = terms * U32 / (1 - terms * U32)
    return 2 * (2 * gamma * magnitude) / 0.5 + 4 * U32


def int8_distance_bound(query: np.ndarray, refs: np.ndarray, levels: int, ref_dist: np.ndarray) -> np.ndarray:
    """Elementwise bound ``[P, N]`` on |int8 distance - fp32 distance|: rounding to the grid moves each
    component by at most half a step (step = row max / levels), so a cosine moves by at most
    s_r/2 |q|_1 + s_q/2 |r^|_1 (plus fp32 rounding); a max over patches moves no more than its terms, and
    sqrt(2 - 2c) moves by at most 2 dc / d (and sqrt(2 dc) near 0)."""
    s_q = np.abs(query).max(axis=1) / 127.0                      # queries always use 8 bits (u8, zero point 128)
    s_r = np.abs(refs).max(axis=1) / levels
    r_hat = np.rint(refs / s_r[:, None]) * s_r[:, None]
    dc = (s_r[None, :] / 2) * np.abs(query).sum(1)[:, None] + (s_q[:, None] / 2) * np.abs(r_hat).sum(1)[None, :]
    dc = dc.reshape(len(query), -1, len(query)).max(axis=2) + 8 * U32     # per (query patch, member)
    return np.minimum(np.sqrt(2 * dc), 2 * dc / np.maximum(ref_dist, 1e-12)) + 4 * U32


def _member(rng, n_sets=2):
    return [l2_normalise(rng.normal(size=(P, D))).astype(np.float32) for _ in range(n_sets)]


def _pool(rng, capacity=6, size=6):
    pool = FeaturePool(capacity, 2, P, D, min_size=2)
    for i in range(size):
        member = _member(rng)
        pool.admit(f"p{i}", member, 0.1, member[0][0])
    return pool


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_graph_matches_numpy_reference(precision):
    rng = np.random.default_rng(0)
    pool = _pool(rng, capacity=6, size=4)          # not full: refs are a strided view
    scorer = PoolScorer(2, P, D, pool.capacity, precision)
    for _ in range(4):                              # admissions and evictions between parts are mirrored
        query = _member(rng)
        k = interval_k(pool.size, 0.3)
        ours, ref = scorer.score(query, pool, k), numpy_score(query, pool, k)
        assert ours.patch.shape == (P,) and [d.shape for d in ours.dists] == [(P, pool.size)] * 2
        bounds = [np.full(d.shape, fp32_order_tolerance(D)) if precision == "fp32" else
                  int8_distance_bound(q, pool.work[s, :pool.size * P], scorer.ref_levels, d)
                  for s, (q, d) in enumerate(zip(query, ref.dists))]
        for a, b, bound in zip(ours.dists, ref.dists, bounds):
            assert (np.abs(a - b) <= bound).all(), np.abs(a - b).max()
        # the patch score is a mean of k distances per set, averaged over the sets: it moves no more than they do
        assert (np.abs(ours.patch - ref.patch) <= np.max([b.max(axis=1) for b in bounds], axis=0) + 4 * U32).all()
        pool.admit(f"q{_}", query, 0.1, query[0][0])


def _exact_integer_distances(query: np.ndarray, scorer: PoolScorer, s: int, n: int) -> np.ndarray:
    """What the INT8 graph computes, in exact integer arithmetic (float64 for the rescaling)."""
    values, scale = quantize_rows(query, zero_point=128)
    dots = (values.astype(np.int64) - 128) @ scorer.refs[s, :, :n].astype(np.int64)     # exact, no saturation
    best = (dots * scorer.scales[s, :n].astype(np.float64)).reshape(P, -1, P).max(axis=2) * scale[:, None]
    return np.sqrt(np.maximum(2 - 2 * np.clip(best, -1, 1), 0))


WORST_CASE = "all-positive rows (worst case for 16-bit pair sums)"


def int8_product_check(levels: int, inputs: str) -> list[tuple[bool, float]]:
    """Per feature set, (whether the INT8 graph's distances equal the exact integer ones up to fp32 rounding,
    the largest difference) on this CPU, with references quantized to ``levels``. ``inputs``: "random", or
    :data:`WORST_CASE`, where every u8 query value is 255 and every reference value +levels, so that
    2 x 255 x 127 overflows a 16-bit pair sum."""
    rng = np.random.default_rng(7)
    if inputs == "random":
        pool, query = _pool(rng), _member(rng)
    else:
        flat = np.full((P, D), 1 / np.sqrt(D), np.float32)
        pool = FeaturePool(6, 2, P, D, min_size=2)
        for i in range(6):
            pool.admit(f"p{i}", [flat, flat], 0.1, flat[0])
        query = [flat, flat]
    scorer = PoolScorer(2, P, D, pool.capacity, "int8")
    scorer.ref_levels = levels
    ours = scorer.score(query, pool, interval_k(pool.size, 0.3))
    checks = []
    for s in range(2):
        exact = _exact_integer_distances(query[s], scorer, s, pool.size * P)
        # fp32: the int32 sum (< 2^24, exact) times two scales (2u), 2 - 2c and sqrt (2u each), over d >= 1/2
        tol = np.minimum(np.sqrt(2 * 8 * U32), 2 * 8 * U32 / np.maximum(exact, 1e-12)) + 4 * U32
        error = np.abs(ours.dists[s] - exact)
        checks.append((bool((error <= tol).all()), float(error.max())))
    return checks


@pytest.mark.parametrize("levels", [63, pytest.param(127, marks=needs_exact_8bit)])
@pytest.mark.parametrize("inputs", ["random", WORST_CASE])
def test_int8_graph_is_the_exact_integer_product(levels, inputs):
    for exact, error in int8_product_check(levels, inputs):
        assert exact, f"the INT8 product is not exact on this CPU ({CPU.summary()}): {error}"


def test_scorer_uses_references_that_are_exact_on_this_cpu():
    scorer = PoolScorer(2, P, D, 4, "int8")
    assert scorer.ref_levels == (127 if CPU.int8_exact else 63)


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


@pytest.mark.parametrize("backend, tol", [("onnx-fp32", fp32_order_tolerance(D)), ("onnx-int8", None)])
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
    if tol is None:   # int8: the largest distance move the quantization allows (the map averages distances)
        ref_pool = pools["numpy"]
        tol = max(int8_distance_bound(q, ref_pool.work[s, :8 * P], pools[backend].scorer.ref_levels,
                                      numpy_score(query, ref_pool, 1).dists[s]).max() for s, q in enumerate(query))
    for exclude in (None, "p3"):  # the graph's fused interval mean, and numpy's over the kept members
        ref, ours = (pool.score(query, (4, 4), params, exclude_part_id=exclude) for pool in pools.values())
        assert ours.n_refs == ref.n_refs == (8 if exclude is None else 7)
        np.testing.assert_allclose(ours.map, ref.map, atol=tol)
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
