"""MuSc core on synthetic features where the right answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.scoring import (MuscParams, PoolTooSmallError, interval_k, l2_normalise, prepare, rescore_batch,
                              rescore_one, score_batch, score_one, snamd, upsample)
from musc_edge.edge.scoring.aggregate import box_mean, lnamd
from musc_edge.edge.scoring.msm import one_vs_pool, patch_to_sample_distances
from musc_edge.edge.scoring.msm import score_batch as msm_batch

GRID = (4, 4)
DIM = 16


def normal_parts(n: int, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """n samples whose patches are noisy copies of a few shared prototypes (a homogeneous product)."""
    rng = np.random.default_rng(seed)
    prototypes = l2_normalise(rng.normal(size=(6, DIM)))
    picks = rng.integers(0, len(prototypes), size=(n, GRID[0] * GRID[1]))
    return l2_normalise(prototypes[picks] + noise * rng.normal(size=(n, GRID[0] * GRID[1], DIM)))


def score_against_pool(query: np.ndarray, refs: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """One-vs-pool MSM patch scores of one feature set."""
    return one_vs_pool([query], [refs], fraction).patch


def test_injected_odd_patch_gets_the_top_score():
    feats = normal_parts(12)
    odd = l2_normalise(np.random.default_rng(7).normal(size=DIM))
    feats[5, 9] = odd
    scores = msm_batch(feats.astype(np.float32))
    assert np.unravel_index(scores.argmax(), scores.shape) == (5, 9)
    # The odd patch stands well clear of every normal patch.
    normal = np.delete(scores.ravel(), 5 * scores.shape[1] + 9)
    assert scores[5, 9] > 2 * normal.max()


def test_duplicate_of_a_pool_member_scores_zero_with_k_1():
    pool = normal_parts(10, seed=1).astype(np.float32)
    query = pool[3].copy()
    scores = score_against_pool(query, pool, fraction=0.05)  # k = max(1, floor(0.5)) = 1
    assert np.abs(scores).max() < 1e-3


def test_duplicate_scores_below_fresh_normal_part_with_default_fraction():
    pool = normal_parts(20, seed=2).astype(np.float32)
    duplicate = score_against_pool(pool[4].copy(), pool).max()
    fresh = score_against_pool(normal_parts(1, seed=3)[0].astype(np.float32), pool).max()
    assert duplicate < fresh


def test_batch_scoring_is_permutation_invariant():
    feats = normal_parts(9, seed=4).astype(np.float32)
    feats[2, 0] = l2_normalise(np.ones(DIM))
    perm = np.random.default_rng(0).permutation(len(feats))
    np.testing.assert_allclose(msm_batch(feats)[perm], msm_batch(feats[perm]), atol=1e-6)


def test_batch_equals_one_vs_pool_where_protocols_coincide():
    rng = np.random.default_rng(5)
    layers = [rng.normal(size=(8, 16, DIM)).astype(np.float32) for _ in range(2)]
    params = MuscParams(aggregation="snamd", salient_layer=1)
    sets = prepare(layers, GRID, params)
    batch = score_batch(sets, GRID, params)
    for i in range(len(layers[0])):
        others = [np.delete(fs, i, axis=0) for fs in sets]
        patch_map, raw, feature = score_one([fs[i] for fs in sets], others, GRID, params)
        np.testing.assert_allclose(patch_map, batch.patch_maps[i], atol=1e-5)
        assert raw == pytest.approx(batch.raw[i], abs=1e-5)
        np.testing.assert_allclose(feature, batch.features[i], atol=1e-6)


def test_streaming_rescore_matches_batch_when_pool_is_the_rest_of_the_batch():
    rng = np.random.default_rng(6)
    scores = rng.random(12)
    feats = l2_normalise(rng.normal(size=(12, 8)))
    batch = rescore_batch(scores, feats, (1, 3))
    for i in range(12):
        pool = np.delete(np.arange(12), i)
        one = rescore_one(scores[i], feats[i], scores[pool], feats[pool],
                          (scores.min(), scores.max()), (1, 3))
        assert one == pytest.approx(batch[i], abs=1e-9)


def test_rescore_window_one_is_plain_minmax():
    scores = np.array([3.0, 1.0, 2.0, 5.0])
    feats = l2_normalise(np.eye(4))
    np.testing.assert_allclose(rescore_batch(scores, feats, (1,)), (scores - 1) / 4)


def test_rescore_pulls_an_outlier_towards_its_similar_neighbours():
    scores = np.array([0.0, 0.0, 0.0, 1.0, 0.5])
    feats = l2_normalise(np.array([[1, 0], [1, 0.01], [1, 0.02], [1, 0.015], [0, 1]], dtype=float))
    out = rescore_batch(scores, feats, (1, 4))
    assert out[3] < 1.0 and out[3] == pytest.approx(0.5 + 0.5 * 0.25, abs=0.02)


@pytest.mark.parametrize("n_refs, fraction, expected", [(1, 0.3, 1), (4, 0.3, 1), (10, 0.3, 3), (82, 0.3, 24),
                                                        (40, 0.3, 12), (5, 1.0, 5)])
def test_interval_k(n_refs, fraction, expected):
    assert interval_k(n_refs, fraction) == expected


@pytest.mark.parametrize("call", [
    lambda: interval_k(0),
    lambda: msm_batch(normal_parts(1).astype(np.float32)),
    lambda: patch_to_sample_distances(np.ones((16, DIM), np.float32), np.ones((0, 16, DIM), np.float32)),
    lambda: score_batch([normal_parts(1).astype(np.float32)], GRID),
])
def test_pools_too_small_raise_instead_of_nan(call):
    with pytest.raises(PoolTooSmallError):
        call()


def test_scores_are_finite_for_the_smallest_pool():
    pool = normal_parts(1, seed=8).astype(np.float32)
    assert np.isfinite(score_against_pool(normal_parts(1, seed=9)[0].astype(np.float32), pool)).all()


def test_box_mean_counts_zero_padding_in_the_divisor():
    grid = np.ones((1, 3, 3, 2), dtype=np.float32)
    out = box_mean(grid, 3)
    assert out[0, 1, 1, 0] == pytest.approx(1.0)
    assert out[0, 0, 0, 0] == pytest.approx(4 / 9)
    assert out[0, 0, 1, 0] == pytest.approx(6 / 9)


def test_lnamd_gives_one_unit_norm_set_per_degree():
    grid = np.random.default_rng(0).normal(size=(2, 4, 4, DIM)).astype(np.float32)
    sets = lnamd(grid)
    assert len(sets) == 3
    for fs in sets:
        assert fs.shape == (2, 16, DIM)
        np.testing.assert_allclose(np.linalg.norm(fs, axis=-1), 1.0, atol=1e-5)


def test_snamd_leaves_a_constant_map_unchanged_and_keeps_outliers_sharp():
    constant = np.tile(np.arange(1, DIM + 1, dtype=np.float32), (1, 5, 5, 1))
    out = snamd(constant)
    np.testing.assert_allclose(out, l2_normalise(constant).reshape(1, 25, DIM), atol=1e-5)
    # Large-norm tokens that differ a lot get ~zero weight: an odd token is not diluted by its neighbours.
    spiky = constant * 10
    spiky[0, 2, 2] = -spiky[0, 2, 2]
    pooled = snamd(spiky).reshape(5, 5, DIM)
    assert pooled[2, 2] @ l2_normalise(spiky[0, 2, 2]) > 0.99


def test_upsample_aligns_corners_and_keeps_the_maximum():
    maps = np.array([[[0.0, 1.0], [2.0, 3.0]]], dtype=np.float32)
    up = upsample(maps, (3, 5))
    assert up.shape == (1, 3, 5)
    assert up[0, 0, 0] == 0 and up[0, 0, -1] == 1 and up[0, -1, 0] == 2 and up[0, -1, -1] == 3
    assert up[0, 1, 2] == pytest.approx(1.5)
    assert up.max() == maps.max()


def test_batch_msm_in_bounded_memory_gives_the_same_scores():
    from musc_edge.edge.scoring import msm

    rng = np.random.default_rng(7)
    feats = (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(rng.normal(size=(23, 16, 8))).astype(np.float32)
    whole = msm.score_batch(feats, 0.3)
    n, p = feats.shape[:2]
    chunked = msm.score_batch(feats, 0.3, memory_bytes=3 * p * n * 4 * 5)   # 5 queries at a time
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(msm.score_batch_chunked(feats, msm.interval_k(n - 1), queries=1, refs=3), whole,
                               rtol=1e-6, atol=1e-6)
