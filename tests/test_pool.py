"""The 2D pool (musc_edge.edge.pool) and the admission policy every recipe shares, on synthetic unit features."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.config import PoolGuardSettings, PoolSettings, RecipeSettings
from musc_edge.edge.pool import FeaturePool, outlier_members
from musc_edge.edge.score import PoolScore
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime.recipes import Prepared, Recipe2D, Scoring
from musc_edge.edge.scoring import MuscParams, PoolTooSmallError, l2_normalise, score_one

GRID = (4, 4)
P, D, N_SETS = 16, 8, 2
PARAMS = MuscParams(aggregation="snamd", salient_layer=1)


def parts(n: int, seed: int, noise: float = 0.05) -> list[list[np.ndarray]]:
    """n parts of one product (patches: noisy copies of shared prototypes), ``N_SETS`` x ``[P, D]`` each."""
    rng = np.random.default_rng(seed)
    prototypes = l2_normalise(rng.normal(size=(5, D)))
    out = []
    for _ in range(n):
        picks = rng.integers(0, len(prototypes), size=(N_SETS, P))
        sets = l2_normalise(prototypes[picks] + noise * rng.normal(size=(N_SETS, P, D))).astype(np.float32)
        out.append(list(sets))
    return out


def filled(capacity: int, n: int, seed: int = 0, **kw) -> FeaturePool:
    pool = FeaturePool(capacity, N_SETS, P, D, min_size=min(3, capacity), **kw)
    for i, sets in enumerate(parts(n, seed)):
        pool.admit(f"p{i}", sets, float(i), sets[1][0])
    return pool


def test_pool_score_is_score_one_against_the_stored_members_and_excludes_the_part_itself():
    pool = filled(6, 6)
    pool.rescore_members(GRID, PARAMS)
    members = [pool.sets16[s, :pool.size].astype(np.float32) for s in range(N_SETS)]
    query = parts(1, seed=9)[0]
    result = pool.score(query, GRID, PARAMS)
    assert type(result) is PoolScore   # the one score type of every pool (score.py)
    patch_map, raw, feature = score_one(query, members, GRID, PARAMS)
    np.testing.assert_allclose(result.map, patch_map, atol=1e-6)
    assert result.raw == pytest.approx(raw, abs=1e-6) and result.n_refs == 6
    np.testing.assert_allclose(result.feature, feature, atol=1e-6)
    # The member "p2" scored again: against the other five, exactly as score_one without it.
    again = pool.score(members_of(pool, 2), GRID, PARAMS, exclude_part_id="p2")
    others = [np.delete(m, 2, axis=0) for m in members]
    patch_map, raw, _ = score_one(members_of(pool, 2), others, GRID, PARAMS)
    assert again.n_refs == 5 and again.raw == pytest.approx(raw, abs=1e-6)
    # Not excluded, it finds itself: nearest distance ~0, far below a fresh part's.
    assert pool.score(members_of(pool, 2), GRID, PARAMS).nearest < 0.1 * result.nearest


def members_of(pool: FeaturePool, slot: int) -> list[np.ndarray]:
    return [pool.sets16[s, slot].astype(np.float32) for s in range(N_SETS)]


def test_a_pool_below_min_size_refuses_to_score():
    pool = filled(6, 2)
    with pytest.raises(PoolTooSmallError):
        pool.score(parts(1, seed=9)[0], GRID, PARAMS)


def test_fifo_replaces_the_oldest_non_golden_member_and_all_golden_declines():
    pool = FeaturePool(3, N_SETS, P, D, min_size=2)
    sets = parts(6, seed=1)
    pool.admit("a", sets[0], 0.0, sets[0][1][0], golden=True)
    pool.admit("b", sets[1], 0.0, sets[1][1][0])
    pool.admit("c", sets[2], 0.0, sets[2][1][0])
    assert pool.admit("d", sets[3], 0.0, sets[3][1][0]) == 1          # b was the oldest non-golden
    assert pool.admit("e", sets[4], 0.0, sets[4][1][0]) == 2          # then c
    assert sorted(pool.part_ids) == ["a", "d", "e"]
    pool.golden[:] = True
    assert pool.admit("f", sets[5], 0.0, sets[5][1][0]) is None and "f" not in pool.part_ids


def test_reservoir_admits_about_capacity_over_horizon_and_never_evicts_golden():
    capacity, horizon, arrivals = 4, 40, 2000
    pool = FeaturePool(capacity, N_SETS, P, D, min_size=2, eviction="reservoir", horizon=horizon, seed=3)
    sets = parts(1, seed=2)[0]
    pool.admit("golden", sets, 0.0, sets[1][0], golden=True)
    entered = sum(pool.admit(f"p{i}", sets, 0.0, sets[1][0]) is not None for i in range(arrivals))
    # After the first `horizon` arrivals each enters with probability K / horizon = 0.1 (binomial, 5 sigma).
    expected = capacity + (arrivals - horizon) * capacity / horizon
    assert abs(entered - expected) < 5 * np.sqrt(expected) + horizon * capacity / horizon
    assert "golden" in pool.part_ids and pool.size == capacity


def test_outliers_are_members_far_above_the_median_and_never_golden():
    raw = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 5.0, 6.0])
    golden = np.array([False, False, False, False, False, False, True])
    assert list(outlier_members(raw, golden)) == [5]
    pool = filled(7, 7)
    pool.raw_scores[:7], pool.golden[:7] = raw, golden
    assert pool.drop_outliers() == 1
    assert pool.size == 6 and "p5" not in pool.part_ids and pool.part_ids[5] == "p6"


def test_load_state_keeps_the_last_capacity_members_and_scores_identically():
    big = filled(6, 6)
    big.rescore_members(GRID, PARAMS)
    small = FeaturePool(4, N_SETS, P, D, min_size=3)
    small.load_state(big.state())
    assert small.size == 4 and small.part_ids == ["p2", "p3", "p4", "p5"]
    np.testing.assert_array_equal(small.sets16[:, :4], big.sets16[:, 2:6])
    np.testing.assert_array_equal(small.raw_scores[:4], big.raw_scores[2:6])
    assert small.admissions == big.admissions
    same = FeaturePool(6, N_SETS, P, D, min_size=3)
    same.load_state(big.state())
    query = parts(1, seed=9)[0]
    assert same.score(query, GRID, PARAMS).score == big.score(query, GRID, PARAMS).score
    with pytest.raises(ValueError, match="feature shape"):
        FeaturePool(4, N_SETS + 1, P, D, min_size=3).load_state(big.state())


# ------------------------------------------------------------------------ the admission policy (Recipe.admit)

def recipe(guard: PoolGuardSettings | None = None, **pool) -> Recipe2D:
    def no_features(images):
        raise AssertionError("parts come prepared")
    pool = {"capacity": 8, "min_size": 4, **pool}
    settings = RecipeSettings(pool=PoolSettings(**pool), guard=guard or PoolGuardSettings())
    return Recipe2D("r", settings, Scoring(no_features, GRID, PARAMS, 56, {}), N_SETS, P, D)


def scored_part(r: Recipe2D, pid: str, sets: list[np.ndarray]) -> tuple[PartRecord, Prepared]:
    return r.decide(PartRecord(part_id=pid, recipe="r", capture_time=0.0), Prepared(sets))


def test_admission_takes_accepted_parts_only_never_test_parts_nor_near_duplicates():
    r = recipe(near_duplicate_distance=0.02)
    good = parts(9, seed=4)
    size = r.seed([(PartRecord(part_id=f"s{i}", recipe="r", capture_time=0.0), Prepared(s))
                   for i, s in enumerate(good[:7])])
    assert r.pool.ready and size == r.pool.size
    good = good[2:]
    part, prepared = scored_part(r, "new", good[5])
    assert part.reason in (Reason.OK, Reason.ANOMALY)
    r.threshold = part.score + 1.0                       # accepted
    part, prepared = scored_part(r, "new", good[5])
    assert part.verdict == Verdict.ACCEPT and r.admit(part, prepared) and r.pool.size == size + 1
    twin, prepared = scored_part(r, "twin", good[5])     # the same part seen again
    assert twin.verdict == Verdict.ACCEPT and not r.admit(twin, prepared) and r.rejected_duplicates == 1
    part, prepared = scored_part(r, "bad", good[6])
    part.decide(Verdict.REJECT, Reason.ANOMALY)          # rejected (a threshold must be positive and finite)
    assert not r.admit(part, prepared)
    r.threshold = 1e6                                    # everything accepted
    test, prepared = scored_part(r, "test", good[6])
    test.test_part = True
    assert not r.admit(test, prepared) and r.pool.size == size + 1


@pytest.mark.parametrize("settled", [False, True])
def test_a_pool_half_full_admits_only_its_lowest_scoring_accepted_parts(settled):
    """Below half its capacity a pool takes every accepted part; from half full, only those under the settled
    ceiling."""
    seeds = [(PartRecord(part_id=f"s{i}", recipe="r", capture_time=0.0), Prepared(s))
             for i, s in enumerate(parts(6, seed=4))]
    size = recipe(near_duplicate_distance=0.02).seed(seeds)      # the members the seed keeps after curation
    r = recipe(PoolGuardSettings(admit_below=None, settled_admit_below=1e-3), capacity=2 * size + (not settled),
               min_size=4, near_duplicate_distance=0.02)
    assert r.seed(seeds) == size
    r.threshold = 1e6                                    # everything accepted
    part, prepared = scored_part(r, "new", parts(1, seed=12)[0])
    assert part.verdict == Verdict.ACCEPT and part.score > 1e-3
    assert r.admit(part, prepared) is not settled and r.pool.size == size + (not settled)
    assert r.guard.stats.refused_atypical == int(settled)


def test_warm_up_admits_everything_and_drops_outliers_when_the_pool_first_fills():
    r = recipe()
    good = parts(4, seed=5)
    defect = parts(1, seed=6, noise=0.0)[0]
    defect[0][:6] = defect[1][:6] = l2_normalise(np.random.default_rng(0).normal(size=(6, D))).astype(np.float32)
    for i, sets in enumerate([good[0], good[1], defect, good[2]]):
        part = PartRecord(part_id=f"w{i}", recipe="r", capture_time=0.0)
        r.decide(part, Prepared(sets))
        assert part.reason == Reason.WARMUP and r.admit(part, Prepared(sets))
    # min_size reached: the members were scored among themselves and the defective one dropped.
    assert r.pool.size == 3 and "w2" not in r.pool.part_ids and not r.pool.ready
