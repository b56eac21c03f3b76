"""Pool guard on synthetic features: signatures, look-alikes, the recurring-defect alarm, admission refusal."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from musc_edge.edge.config import PoolGuardSettings, parse_config
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime.inspector import Inspector
from musc_edge.edge.runtime.recipes.recipe2d import Prepared
from musc_edge.edge.runtime.pool_guard import PoolGuard, lookalike_distance, signature

SIDE, DIM = 8, 16


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class Parts:
    """Synthetic scored parts: random unit patch features, a flat low map, and optionally a defect: a hot
    patch at a given place with a given look (feature direction)."""

    def __init__(self, seed: int = 0, side: int = SIDE, dim: int = DIM, n_sets: int = 2):
        self.rng = np.random.default_rng(seed)
        self.side, self.dim, self.n_sets = side, dim, n_sets
        self.count = 0

    def make(self, verdict: Verdict, defect: tuple[tuple[int, int], np.ndarray] | None = None, heat: float = 1.0):
        side = self.side
        sets = [unit(self.rng.normal(size=(side * side, self.dim))).astype(np.float32) for _ in range(self.n_sets)]
        amap = self.rng.uniform(0, 0.02, size=(side, side)).astype(np.float32)
        if defect is not None:
            (r, c), look = defect
            amap[r, c] = heat
            for s in sets:
                s[r * side + c] = unit(look + 0.02 * self.rng.normal(size=self.dim))
        self.count += 1
        part = PartRecord(part_id=f"p{self.count}", recipe="default", capture_time=float(self.count))
        part.decide(verdict, Reason.OK if verdict == Verdict.ACCEPT else Reason.ANOMALY)
        part.anomaly_map, part.score = amap, 0.5
        return part, Prepared(sets)

    def look(self) -> np.ndarray:
        return unit(self.rng.normal(size=self.dim))


def feed(guard: PoolGuard, part, prepared) -> str | None:
    return guard.observe(part, prepared)


def test_signature_takes_the_hottest_patches_and_block_averages_a_fine_map():
    parts = Parts()
    look = parts.look()
    part, prep = parts.make(Verdict.REJECT, ((2, 5), look))
    sig = signature(part.anomaly_map, prep.sets, top=1)
    assert sig.positions.tolist() == [[2, 5]]
    np.testing.assert_allclose(np.linalg.norm(sig.vectors, axis=1), 1.0, atol=1e-5)
    assert lookalike_distance(sig, sig, reach=0) == pytest.approx(0.0, abs=1e-3)
    # An image-sized map (scan recipes) lands on the same patch.
    fine = np.kron(part.anomaly_map, np.ones((4, 4), np.float32))
    assert signature(fine, prep.sets, top=1).positions.tolist() == [[2, 5]]
    assert signature(part.anomaly_map, [], top=3) is None


def test_lookalikes_must_share_the_place_and_the_look():
    parts = Parts()
    look = parts.look()

    def sig(place, look):
        part, prep = parts.make(Verdict.REJECT, (place, look))
        return signature(part.anomaly_map, prep.sets, top=1)

    a, same, elsewhere, other = sig((3, 3), look), sig((3, 4), look), sig((6, 0), look), sig((3, 3), parts.look())
    assert lookalike_distance(a, same, reach=1) < PoolGuardSettings().lookalike_distance
    assert lookalike_distance(a, same, reach=0) == float("inf")
    assert lookalike_distance(a, elsewhere, reach=1) == float("inf")
    assert lookalike_distance(a, other, reach=1) > 0.8


@pytest.mark.parametrize("heat, alarmed", [(0.05, False), (1.0, True)])
def test_rejects_must_be_closer_to_each_other_than_to_the_pool(heat, alarmed):
    """Good parts rejected near a low threshold share places (a reflection), but they are about as far from
    each other as from the pool (their anomaly): no alarm, no refusal. A true defect is far from the pool."""
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings(alarm_rejects=3, lookalike_distance=1.0, lookalike_ratio=0.7))
    look = ((3, 3), parts.look())
    texts = [feed(guard, *parts.make(Verdict.REJECT, look, heat=heat)) for _ in range(10)]
    assert any(texts) == alarmed
    assert guard.allow_admission(*parts.make(Verdict.ACCEPT, look, heat=heat)) != alarmed


def test_recurring_defect_raises_the_alarm_and_its_lookalikes_are_refused():
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings(window=30, alarm_rejects=4, min_partners=2))
    scratch = ((1, 6), parts.look())
    for _ in range(20):
        assert feed(guard, *parts.make(Verdict.ACCEPT)) is None
    alarms = []
    for i in range(30):
        part, prep = parts.make(Verdict.REJECT if i % 3 == 0 else Verdict.ACCEPT, scratch if i % 3 == 0 else None)
        if (text := feed(guard, part, prep)) is not None:
            alarms.append((i, text))
    assert len(alarms) == 1 and guard.active
    first, text = alarms[0]
    assert first == 9       # the 4th look-alike reject (parts 0, 3, 6, 9 of the run): 3 partners each
    assert "recurring defect" in text and "(1, 6)" in text
    # A look-alike that slipped under the threshold is accepted but kept out of the pool ...
    slipped, prep = parts.make(Verdict.ACCEPT, scratch)
    feed(guard, slipped, prep)
    assert not guard.allow_admission(slipped, prep)
    # ... while a good part, and a part with another defect elsewhere, are admitted.
    good, prep = parts.make(Verdict.ACCEPT)
    feed(guard, good, prep)
    assert guard.allow_admission(good, prep)
    odd, prep = parts.make(Verdict.ACCEPT, ((6, 1), parts.look()))
    assert guard.allow_admission(odd, prep)
    assert guard.stats.refused_lookalikes == 1


def test_lookalikes_are_refused_before_the_alarm():
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings())
    scratch = ((4, 4), parts.look())
    feed(guard, *parts.make(Verdict.REJECT, scratch))
    assert not guard.active
    assert not guard.allow_admission(*parts.make(Verdict.ACCEPT, scratch))


def test_random_defects_raise_no_alarm():
    parts = Parts(seed=3)
    guard = PoolGuard(PoolGuardSettings(window=60, alarm_rejects=5))
    alarms = []
    for i in range(300):  # a third of the parts are rejected, each with its own defect somewhere
        defect = ((int(parts.rng.integers(SIDE)), int(parts.rng.integers(SIDE))), parts.look()) if i % 3 == 0 else None
        if (text := feed(guard, *parts.make(Verdict.REJECT if defect else Verdict.ACCEPT, defect))) is not None:
            alarms.append(text)
    assert alarms == [] and guard.stats.rejects == 100


def test_alarm_clears_when_the_defect_stops_and_is_raised_again_when_it_returns():
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings(window=20, memory=40, alarm_rejects=4))
    scratch = ((0, 0), parts.look())
    texts = []
    for phase in ("defect", "clean", "defect"):
        for i in range(20):
            hit = phase == "defect" and i % 2 == 0
            text = feed(guard, *parts.make(Verdict.REJECT if hit else Verdict.ACCEPT, scratch if hit else None))
            if text is not None:
                texts.append(text)
    assert [t.split(":")[0] for t in texts] == ["recurring defect", "recurring defect cleared", "recurring defect"]
    assert guard.stats.alarms == 2


def test_a_reject_is_forgotten_after_memory_parts():
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings(memory=10))
    scratch = ((5, 2), parts.look())
    feed(guard, *parts.make(Verdict.REJECT, scratch))
    for _ in range(10):
        feed(guard, *parts.make(Verdict.ACCEPT))
    slipped, prep = parts.make(Verdict.ACCEPT, scratch)
    feed(guard, slipped, prep)
    assert guard.allow_admission(slipped, prep)


def test_disabled_guard_neither_alarms_nor_refuses():
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings(enabled=False, alarm_rejects=2))
    scratch = ((2, 2), parts.look())
    assert all(feed(guard, *parts.make(Verdict.REJECT, scratch)) is None for _ in range(10))
    assert guard.allow_admission(*parts.make(Verdict.ACCEPT, scratch))


def test_parts_without_a_verdict_or_2d_features_are_ignored_safely():
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings())
    part, prep = parts.make(Verdict.ACCEPT)
    part.decide(Verdict.NO_VERDICT, Reason.WARMUP)
    assert feed(guard, part, prep) is None and guard.stats.observed == 0
    scan_only, _ = parts.make(Verdict.REJECT)       # a 3d recipe: no 2D feature sets
    assert feed(guard, scan_only, SimpleNamespace(sets=[])) is None
    assert guard.allow_admission(scan_only, SimpleNamespace(sets=[]))
    assert feed(guard, scan_only, None) is None


def test_parts_above_the_pools_own_range_are_not_admitted():
    """With a calibrated threshold above 1, an accepted part scoring above the pool's range would stretch it."""
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings(admit_below=1.5))
    typical, atypical, warming = (parts.make(Verdict.ACCEPT) for _ in range(3))
    typical[0].score, atypical[0].score, warming[0].score = 1.2, 1.5, None
    assert guard.allow_admission(*typical) and guard.allow_admission(*warming)
    assert not guard.allow_admission(*atypical)
    assert guard.stats.refused_atypical == 1
    assert PoolGuard(PoolGuardSettings(admit_below=None)).allow_admission(*atypical)


@pytest.mark.parametrize("score, fill, admitted", [
    (0.6, 0.0, True),    # a young pool takes every accepted part below admit_below
    (0.6, 0.49, True),
    (0.6, 0.5, False),   # half full: only the lower half of the pool's range
    (0.49, 1.0, True),
    (0.5, 1.0, False),
    (1.5, 0.2, False),   # admit_below holds at any fill
])
def test_a_settled_pool_admits_only_its_lower_range(score, fill, admitted):
    parts = Parts()
    guard = PoolGuard(PoolGuardSettings(admit_below=1.5, settled_admit_below=0.5))
    part = parts.make(Verdict.ACCEPT)
    part[0].score = score
    assert guard.allow_admission(*part, pool_fill=fill) is admitted
    assert guard.stats.refused_atypical == int(not admitted)


def test_the_settled_ceiling_can_be_switched_off():
    guard = PoolGuard(PoolGuardSettings(admit_below=1.5, settled_admit_below=None))
    assert guard.admission_ceiling(1.0) == 1.5
    assert PoolGuard(PoolGuardSettings(admit_below=None, settled_admit_below=None)).admission_ceiling(1.0) is None
    assert PoolGuard(PoolGuardSettings(admit_below=0.3, settled_admit_below=0.5)).admission_ceiling(1.0) == 0.3


def test_bank_lookup_agrees_with_the_pairwise_distance():
    parts = Parts(seed=5)
    settings = PoolGuardSettings(lookalike_distance=0.6, lookalike_ratio=2.0, memory=1000, top_patches=2)
    guard = PoolGuard(settings)
    looks = [parts.look() for _ in range(3)]

    def random_part(verdict):
        place = (int(parts.rng.integers(3)), int(parts.rng.integers(3)))
        return parts.make(verdict, (place, looks[int(parts.rng.integers(3))]), heat=float(parts.rng.uniform(0.2, 1)))
    for _ in range(40):
        feed(guard, *random_part(Verdict.REJECT))
    for _ in range(20):
        part, prep = random_part(Verdict.ACCEPT)
        sig = signature(part.anomaly_map, prep.sets, settings.top_patches)
        expected = [lookalike_distance(sig, r.sig, settings.reach)
                    <= min(settings.lookalike_distance, settings.lookalike_ratio * min(sig.anomaly, r.sig.anomaly))
                    for r in guard._rejects]
        assert guard.lookalikes(sig).tolist() == expected
        assert any(expected) and not all(expected)


def test_the_inspector_raises_the_alarm_and_keeps_lookalikes_out_of_the_pool(toy_model, tmp_path):
    config = parse_config({
        "model": {"path": str(toy_model)},
        "recipes": {"default": {"pool": {"capacity": 30, "min_size": 2}, "guard": {"alarm_rejects": 3}}},
        "source": {"type": "replay", "paths": ["unused.png"]},
        "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:1"}, "storage": {"dir": str(tmp_path)}}, "test")
    inspector = Inspector(config)
    alarms: list[str] = []
    inspector.on_alarm = alarms.append
    pool = inspector.recipes["default"].pool
    parts = Parts(side=inspector.grid[0], dim=inspector.engine.manifest.token_dim, n_sets=pool.n_sets)
    scratch = ((2, 7), parts.look())
    assert all(inspector.admit(*parts.make(Verdict.ACCEPT)) for _ in range(5))
    for _ in range(3):
        assert not inspector.admit(*parts.make(Verdict.REJECT, scratch))
    assert len(alarms) == 1 and alarms[0].startswith("recipe default: recurring defect")
    size = pool.size
    assert not inspector.admit(*parts.make(Verdict.ACCEPT, scratch))    # slipped under the threshold
    assert inspector.admit(*parts.make(Verdict.ACCEPT))
    assert pool.size == size + 1


# -- row 21 of issue 21: a recurring defect from the first part, inside warm-up ------------------------------
class WarmupPool:
    """The part of a 2D pool the warm-up check reads: members' patch sets (``sets16``), golden flags, removal."""

    def __init__(self, sets: list[np.ndarray], golden: np.ndarray | None = None):
        self.sets16 = np.stack(sets, axis=1).astype(np.float16)       # [n_sets, n, P, D]
        self.size = self.sets16.shape[1]
        self.golden = np.zeros(self.size, bool) if golden is None else golden
        self.removed: list[int] = []

    def remove(self, slots: np.ndarray) -> None:
        self.removed += [int(i) for i in slots]


def product_members(n: int, recurring: list[int], seed: int = 0, where: int = 27,
                    lone_defects: tuple[int, ...] = ()) -> list[np.ndarray]:
    """``n`` members of one product (each patch near that place's look), ``recurring`` of them carrying one
    defect look at patch ``where``, ``lone_defects`` each carrying a different one (at another place)."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(2, SIDE * SIDE, DIM)))
    defect = unit(rng.normal(size=DIM))
    members = []
    for i in range(n):
        sets = unit(base + 0.08 * rng.normal(size=base.shape))
        if i in recurring:
            sets[:, where] = unit(defect + 0.02 * rng.normal(size=(2, DIM)))
        if i in lone_defects:
            sets[:, 9 + i % 40] = unit(rng.normal(size=(2, DIM)))
        members.append(sets.astype(np.float32))
    return members


def settings(**over) -> PoolGuardSettings:
    return PoolGuardSettings(**over)


def test_a_defect_repeated_inside_warm_up_leaves_the_pool_and_raises_the_alarm():
    recurring = [1, 4, 6, 9]          # 30 % of a 14-member warm-up pool, from the first parts on
    pool = WarmupPool(product_members(14, recurring))
    guard = PoolGuard(settings())
    assert guard.keep_out_recurring(pool) == 4 and sorted(pool.removed) == recurring
    part, prepared = Parts(seed=1).make(Verdict.ACCEPT)
    alarm = guard.observe(part, prepared)                  # the next part carries the alarm to the line
    assert alarm and "recurring defect inside warm-up: 4 of 14" in alarm and "(3, 3)" in alarm
    assert guard.stats.alarms == 1 and guard.observe(*Parts(seed=2).make(Verdict.ACCEPT)) is None
    # a look-alike arriving after warm-up is kept out of the pool even if it slips under the threshold
    twin = product_members(15, [14], seed=0)[14]
    lookalike = PartRecord(part_id="twin", recipe="default", capture_time=1.0)
    lookalike.decide(Verdict.ACCEPT, Reason.OK)
    lookalike.score, lookalike.anomaly_map = 0.5, np.zeros((SIDE, SIDE), np.float32)
    lookalike.anomaly_map[3, 3] = 1.0
    assert not guard.allow_admission(lookalike, Prepared(list(twin)))


@pytest.mark.parametrize("members, why", [
    (product_members(14, []), "only good parts"),
    (product_members(14, [], lone_defects=(2, 7, 11)), "defects that differ in place and look"),
    (product_members(14, [3]), "a single defect (drop_outliers' job, not a recurring one)"),
])
def test_a_warm_up_pool_without_a_recurring_defect_is_left_alone(members, why):
    pool = WarmupPool(members)
    guard = PoolGuard(settings())
    assert guard.keep_out_recurring(pool) == 0 and pool.removed == [], why
    assert guard.observe(*Parts(seed=3).make(Verdict.ACCEPT)) is None


def test_a_group_with_a_golden_member_stays_and_a_disabled_guard_does_nothing():
    golden = np.zeros(14, bool)
    golden[4] = True                  # a technician froze one of them: a product variant, not a defect
    pool = WarmupPool(product_members(14, [1, 4, 6, 9]), golden)
    assert PoolGuard(settings()).keep_out_recurring(pool) == 0 and pool.removed == []
    pool = WarmupPool(product_members(14, [1, 4, 6, 9]))
    assert PoolGuard(settings(enabled=False)).keep_out_recurring(pool) == 0 and pool.removed == []
