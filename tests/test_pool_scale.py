"""The score scale of a pool (``pool.scale``): frozen when the members are scored among themselves, or moving
with the members' stored scores. Table-driven over both pool kinds (2D feature pool, scan pool)."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.config import ConfigError, PoolSettings, RecipeSettings, parse_config
from musc_edge.edge.pool import FeaturePool, pool_range
from musc_edge.edge.scan_pool import ScanPool
from musc_edge.edge.score import PreparedScan
from musc_edge.edge.scoring import MuscParams, l2_normalise
from musc_edge.edge.scoring3d import Params3D, prepare_3d
from musc_edge.edge.synthetic3d import generate_set

PARAMS = MuscParams(aggregation="snamd", salient_layer=1)   # re-scoring windows (1,): score = (raw - lo) / (hi - lo)
GRID, P, D, N_SETS = (4, 4), 16, 8, 2


def image_parts(n: int, seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    prototypes = l2_normalise(rng.normal(size=(5, D)))
    return [list(l2_normalise(prototypes[rng.integers(0, 5, size=(N_SETS, P))]
                              + 0.05 * rng.normal(size=(N_SETS, P, D))).astype(np.float32)) for _ in range(n)]


@pytest.fixture(scope="module")
def scans() -> list[PreparedScan]:
    data = generate_set(9, seed=4, defect_fraction=0.0, size=64)
    params = Params3D(size=64, n_groups=48, group_size=16, normal_neighbours=6)
    return [PreparedScan([], prepare_3d(c, params)) for c in data.clouds]


class ImageKind:
    grid = GRID

    def __init__(self, _scans):
        self.parts = image_parts(9, seed=3)

    def pool(self, capacity: int = 6, **kw) -> FeaturePool:
        return FeaturePool(capacity, N_SETS, P, D, min_size=3, **kw)

    def admit(self, pool, i: int, raw: float) -> None:
        pool.admit(f"p{i}", self.parts[i], raw, self.parts[i][1][0])


class ScanKind:
    grid = None

    def __init__(self, scans):
        self.parts = scans

    def pool(self, capacity: int = 6, **kw) -> ScanPool:
        return ScanPool("3d", capacity, n_sets=0, patches=0, dim=0, image_size=64, min_size=3, sigma=1.0, **kw)

    def admit(self, pool, i: int, raw: float) -> None:
        pool.admit(f"p{i}", self.parts[i], raw, None)


@pytest.fixture(params=[ImageKind, ScanKind], ids=["image-pool", "scan-pool"])
def kind(request, scans):
    return request.param(scans)


def warmed(kind, **kw):
    """A pool of five members scored among themselves (as warm-up curation or seeding leaves it)."""
    pool = kind.pool(**kw)
    for i in range(5):
        kind.admit(pool, i, 0.0)
    pool.rescore_members(kind.grid, PARAMS)
    return pool


def test_a_frozen_scale_is_set_when_the_members_are_scored_together_and_kept_while_members_come(kind):
    pool = warmed(kind)
    lo, hi = pool_range(pool.raw_scores[:5], PARAMS.pool_quantiles)
    assert pool.scale == (lo, hi) and hi > lo
    query = kind.parts[8]
    first = pool.score(query, kind.grid, PARAMS)
    assert first.score == pytest.approx((first.raw - lo) / (hi - lo), rel=1e-9)
    kind.admit(pool, 5, 50.0 * hi)   # a member whose stored score would stretch a moving range
    later = pool.score(query, kind.grid, PARAMS)
    assert pool.scale == (lo, hi)
    assert later.score == pytest.approx((later.raw - lo) / (hi - lo), rel=1e-9)


def test_the_members_scale_moves_with_the_members_stored_scores(kind):
    pool = warmed(kind, scale="members")
    query = kind.parts[8]
    before = pool.score(query, kind.grid, PARAMS)
    kind.admit(pool, 5, 50.0 * pool.raw_scores[:5].max())
    after = pool.score(query, kind.grid, PARAMS)
    lo, hi = pool_range(pool.raw_scores[:6], PARAMS.pool_quantiles)
    assert after.score == pytest.approx((after.raw - lo) / (hi - lo), rel=1e-9)
    assert after.score < before.score   # the stretched range lowers the same part's score


def test_leave_one_out_scores_are_on_the_frozen_scale(kind):
    pool = warmed(kind)
    lo, hi = pool.scale
    expected = (pool.raw_scores[:5] - lo) / (hi - lo)
    np.testing.assert_allclose(pool.leave_one_out_scores(PARAMS), expected, rtol=1e-9)


def test_the_scale_survives_a_restart_and_an_older_stored_pool_freezes_one_from_its_members(kind):
    pool = warmed(kind)
    kind.admit(pool, 5, 7.0)
    restored = kind.pool()
    restored.load_state(pool.state())
    query = kind.parts[8]
    assert restored.scale == pool.scale
    assert restored.score(query, kind.grid, PARAMS).score == pool.score(query, kind.grid, PARAMS).score
    older = {k: v for k, v in pool.state().items() if k != "scale"}   # stored before scales were frozen
    legacy = kind.pool()
    legacy.load_state(older)
    assert legacy.scale == pool_range(pool.raw_scores[:6], PARAMS.pool_quantiles)
    empty = kind.pool()
    empty.load_state(kind.pool().state())
    assert empty.scale is None


def test_a_recipe_freezes_its_scale_when_warm_up_fills_the_pool_and_the_config_names_a_bad_policy():
    from musc_edge.edge.record import PartRecord, Reason, Verdict
    from musc_edge.edge.runtime.recipes import Prepared, Recipe2D, Scoring

    settings = RecipeSettings(pool=PoolSettings(capacity=8, min_size=4))
    recipe = Recipe2D("r", settings, Scoring(None, GRID, PARAMS, 56, {}), N_SETS, P, D)
    assert recipe.pool.scale_policy == "frozen" and recipe.pool.scale is None
    for i, sets in enumerate(image_parts(4, seed=5)):
        part = PartRecord(part_id=f"w{i}", recipe="r", capture_time=0.0).decide(Verdict.NO_VERDICT, Reason.WARMUP)
        recipe.admit(part, Prepared(sets))
    assert recipe.pool.ready and recipe.pool.scale == pool_range(recipe.pool.raw_scores[:recipe.pool.size],
                                                                 PARAMS.pool_quantiles)
    moving = Recipe2D("m", RecipeSettings(pool=PoolSettings(scale="members")), Scoring(None, GRID, PARAMS, 56, {}),
                      N_SETS, P, D)
    assert moving.pool.scale_policy == "members"
    with pytest.raises(ConfigError, match="recipes.default.pool.scale"):
        parse_config({"recipes": {"default": {"pool": {"scale": "sliding"}}}})
