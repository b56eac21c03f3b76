"""The shadow trial's own logic, without models: the comparison of both paths and the trial's bounded state."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.pool import FeaturePool, pool_range
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime import fast_path
from musc_edge.edge.runtime.fast_path import (MAX_PENDING_SHADOWS, MAX_SAMPLES, FastPath, FastPathPlan,
                                              ShadowSample, compare_paths, shadow_pool)
from musc_edge.edge.scoring import MuscParams
from musc_edge.edge.scoring.msm import patch_to_sample_distances

GRID, SETS, DIM = (4, 4), 2, 32
PATCHES = GRID[0] * GRID[1]
EPS32 = float(np.finfo(np.float32).eps)


def _unit16(x: np.ndarray) -> np.ndarray:
    """Unit rows, rounded to what a pool stores (float16): a member's query then equals its stored copy."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16).astype(np.float32)


def _part(rng, base: np.ndarray, anomaly: float) -> list[np.ndarray]:
    """A part: the shared base patches with a little noise, and one patch turned by ``anomaly`` (a clear arg-max,
    so the re-scoring feature does not hang on a near tie)."""
    sets = []
    for s in range(SETS):
        x = base[s] + 0.08 * rng.normal(size=(PATCHES, DIM))
        x[rng.integers(PATCHES)] += anomaly * rng.normal(size=DIM)
        sets.append(_unit16(x))
    return sets


def _trial(seed: int, members: int = 9, others: int = 3) -> tuple[list[ShadowSample], FeaturePool, MuscParams]:
    """Warm-up samples (the first ``members`` fill the fp32 pool) whose fast features are their fp32 ones moved
    a little (more for a few parts, so some verdicts can flip between the paths)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(SETS, PATCHES, DIM))
    params = MuscParams()
    samples = []
    for i in range(members + others):
        fp32 = _part(rng, base, anomaly=rng.uniform(0.1, 0.6))
        shift = 0.02 if i % 4 else 0.15
        fast = [_unit16(x + shift * rng.normal(size=x.shape)) for x in fp32]
        samples.append(ShadowSample("default", f"p{i}", fp32, fast))
    pool = FeaturePool(members + others, SETS, PATCHES, DIM, min_size=4)
    for s in samples[:members]:
        pool.admit(s.part_id, s.fp32, 0.0, np.zeros(DIM, np.float32))
    pool.rescore_members(GRID, params)
    return samples, pool, params


def _one_vs_pool_scores(pool: FeaturePool, sets: list[list[np.ndarray]], ids: list[str],
                        params: MuscParams) -> np.ndarray:
    """What the trial computed before members' scores came from the members' batch: every sample one-vs-pool."""
    return np.array([pool.score(x, GRID, params, exclude_part_id=pid).score for x, pid in zip(sets, ids)])


def _score_tolerance(pool: FeaturePool, samples: list[ShadowSample], fast: bool, params: MuscParams) -> float:
    """How far a batch score and a one-vs-pool score of the same float16-exact part may differ: float32 dot
    products of unit vectors are off by at most DIM * eps, a distance ``sqrt(2 - 2 cos)`` by that over the
    distance, and a score is an average of raw scores divided by the pool's range (hi - lo)."""
    members = pool.part_ids[:pool.size]
    nearest = min(float(patch_to_sample_distances(
        (s.fast if fast else s.fp32)[k], pool.sets16[k, [j for j, m in enumerate(members) if m != s.part_id]]
        .astype(np.float32)).min()) for s in samples for k in range(SETS))
    ranges = [np.subtract(*pool_range(np.delete(pool.raw_scores[:pool.size], i), params.pool_quantiles)[::-1])
              for i in range(pool.size)]
    return 4 * DIM * EPS32 / nearest / min(ranges)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scorer", ["numpy", "onnx-fp32", "onnx-int8"])
def test_the_comparison_gives_the_numbers_of_one_vs_pool_for_every_part(monkeypatch, seed, scorer):
    # the numbers the fast scale's alignment starts from (the alignment has its own test in test_fast_path.py)
    monkeypatch.setattr(fast_path, "align_scale", lambda pool, ours, fast: (fast, 1.0, 0.0))
    samples, fp32_pool, params = _trial(seed)
    fast_pool = shadow_pool(fp32_pool, {s.part_id: s for s in samples}, scorer, GRID, params)
    ids = [s.part_id for s in samples]
    ours = _one_vs_pool_scores(fp32_pool, [s.fp32 for s in samples], ids, params)
    fast = _one_vs_pool_scores(fast_pool, [s.fast for s in samples], ids, params)
    tol = max(_score_tolerance(fp32_pool, samples, False, params), _score_tolerance(fast_pool, samples, True, params))
    # a threshold in the widest gap between the scores, so no verdict hangs on a rounding
    cuts = np.sort(np.concatenate([ours, fast]))
    gap = int(np.argmax(np.diff(cuts[2:-2]))) + 2
    threshold = float(cuts[gap:gap + 2].mean())
    assert cuts[gap + 1] - cuts[gap] > 2 * tol
    result = compare_paths(samples, fp32_pool, fast_pool, threshold, GRID, params)
    same = (ours >= threshold) == (fast >= threshold)
    assert result.parts == len(samples) and result.same_verdicts == int(same.sum())
    assert result.flipped == tuple(pid for pid, ok in zip(ids, same) if not ok)
    assert result.score_drift == pytest.approx(float(np.median(np.abs(fast - ours))), abs=2 * tol)
    assert result.score_drift > 10 * tol   # the paths do differ: the comparison measures something


@pytest.mark.parametrize("scorer", ["numpy", "onnx-fp32", "onnx-int8"])
def test_only_an_approximate_scorer_scores_members_one_vs_pool_again(monkeypatch, scorer):
    samples, fp32_pool, params = _trial(3, members=10, others=2)
    fast_pool = shadow_pool(fp32_pool, {s.part_id: s for s in samples}, scorer, GRID, params)
    calls = {"fp32": [], "fast": []}

    def counted(side, score):
        return lambda *args, **kwargs: calls[side].append(args) or score(*args, **kwargs)
    monkeypatch.setattr(fp32_pool, "score", counted("fp32", fp32_pool.score))
    monkeypatch.setattr(fast_pool, "score", counted("fast", fast_pool.score))
    result = compare_paths(samples, fp32_pool, fast_pool, 0.5, GRID, params)
    assert result.parts == 12 and len(calls["fp32"]) == 2   # the two parts that are not members
    # an exact scorer gives the members' batch numbers; the INT8 one is what the line will run: its error counts
    assert len(calls["fast"]) == (12 if scorer == "onnx-int8" else 2)


def _decided(part_id: str, reason: Reason = Reason.WARMUP) -> PartRecord:
    part = PartRecord(part_id=part_id, recipe="default", capture_time=0.0)
    return part.decide(Verdict.NO_VERDICT, reason)


def test_a_switch_carries_the_shadow_features_of_undecided_parts():
    sets = [np.ones((PATCHES, DIM), np.float32)]
    switched = FastPath(FastPathPlan(None))
    for pid in ("decided", "ahead"):
        switched.keep_shadow(pid, sets)
    switched.observe("default", _decided("decided"), sets)
    assert switched.carried("ahead") is None          # no switch yet: the fp32 features decide it
    switched.finish(True, "passes")
    assert not switched.samples                      # the trial's samples are not kept after the decision
    assert switched.carried("decided") is None and switched.carried("ahead", take=False) is sets
    assert switched.carried("ahead") is sets and switched.carried("ahead") is None   # taken once
    stayed = FastPath(FastPathPlan(None))
    stayed.keep_shadow("ahead", sets)
    stayed.finish(False, "fails")
    stayed.keep_shadow("late", sets)                 # a shadow finishing after the decision is not kept
    assert stayed.carried("ahead") is None and not stayed._shadow


def test_the_trial_state_stays_bounded():
    sets = [np.zeros((1, 1), np.float32)]
    fast = FastPath(FastPathPlan(None))
    for i in range(MAX_PENDING_SHADOWS + 10):        # parts extracted that never reach a decision
        fast.keep_shadow(f"lost{i}", sets)
    assert len(fast._shadow) == MAX_PENDING_SHADOWS and "lost0" not in fast._shadow
    members = {"p0", "p1"}
    for i in range(MAX_SAMPLES + 5):                 # a warm-up that never fills its pool
        fast.keep_shadow(f"p{i}", sets)
        fast.observe("default", _decided(f"p{i}"), sets, lambda: members)
    assert len(fast.samples) == MAX_SAMPLES and members <= set(fast.samples)
    assert f"p{MAX_SAMPLES + 4}" in fast.samples and "p2" not in fast.samples   # the oldest non-members went
