"""Look-ahead verdicts: later parts as extra MSM references (numpy and the ONNX graph), the worker's window
(when a waiting part falls due), and coverage eviction, on synthetic unit features."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.config import LookAheadSettings
from musc_edge.edge.pool import FeaturePool
from musc_edge.edge.record import PartRecord
from musc_edge.edge.runtime.look_ahead import LookAheadWindow
from musc_edge.edge.scoring import score_one
from musc_edge.edge.scoring.msm import interval_k

from .test_pool import GRID, N_SETS, PARAMS, D, P, filled, parts


def test_look_ahead_parts_count_as_references_exactly_like_members():
    pool = filled(6, 6)
    pool.rescore_members(GRID, PARAMS)
    later = parts(3, seed=5)
    query = parts(1, seed=9)[0]
    with_later = pool.score(query, GRID, PARAMS, look_ahead=later)
    members = [pool.sets16[s, :pool.size].astype(np.float32) for s in range(N_SETS)]
    everyone = [np.concatenate([m, np.stack([x[s] for x in later])]) for s, m in enumerate(members)]
    patch_map, raw, _ = score_one(query, everyone, GRID, PARAMS)
    np.testing.assert_allclose(with_later.map, patch_map, atol=1e-6)
    assert with_later.raw == pytest.approx(raw, abs=1e-6) and with_later.n_refs == 9
    # The near-duplicate measure stays the members': a later twin of the query does not make it "seen".
    twin = pool.score(query, GRID, PARAMS, look_ahead=[query])
    assert twin.nearest == pytest.approx(pool.score(query, GRID, PARAMS).nearest)
    assert twin.raw < with_later.raw   # its twin is a perfect match for every patch


def test_look_ahead_through_the_onnx_graph_matches_numpy():
    pytest.importorskip("onnxruntime")
    numpy_pool, graph_pool = filled(6, 6), filled(6, 6, scorer="onnx-fp32")
    later, query = parts(4, seed=5), parts(1, seed=9)[0]
    a = numpy_pool.score(query, GRID, PARAMS, look_ahead=later)
    b = graph_pool.score(query, GRID, PARAMS, look_ahead=later, exclude_part_id="p1")
    c = numpy_pool.score(query, GRID, PARAMS, look_ahead=later, exclude_part_id="p1")
    # fp32 products of unit vectors in another summation order: a few ulps of 1 in the cosine, whose
    # square root (d = sqrt(2 - 2 cos)) near d ~ 0.3 amplifies them by ~1/d.
    tolerance = 16 * D * np.finfo(np.float32).eps / 0.3
    np.testing.assert_allclose(b.map, c.map, atol=tolerance)
    assert a.n_refs == 10 and b.n_refs == c.n_refs == 9
    assert interval_k(9) == 2


def _part(pid: str, recipe: str, capture: float, deadline: float) -> PartRecord:
    return PartRecord(part_id=pid, recipe=recipe, capture_time=0.0, capture_monotonic=capture, deadline=deadline)


def test_a_waiting_part_falls_due_with_its_look_ahead_complete_or_its_time_up():
    window = LookAheadWindow(lambda recipe: LookAheadSettings(parts=2, max_ms=500, margin_ms=100),
                             initial_scoring_s=0.2)
    window.add(_part("a", "r", capture=0.0, deadline=10.0), extracted="A")
    assert window.due(0.1) is None and 0 < window.wait_s(0.1, idle_s=1.0) <= 0.4
    window.add(_part("b", "r", capture=0.1, deadline=10.1), extracted="B")
    assert window.due(0.2) is None                          # one later part of two
    window.add(_part("c", "other", capture=0.2, deadline=10.2), extracted="C")
    assert window.due(0.2) is None                          # another recipe's part is no reference
    window.add(_part("d", "r", capture=0.3, deadline=10.3), extracted="D")
    head = window.due(0.3)
    assert head.part.part_id == "a" and [w.extracted for w in window.references(head)] == ["B", "D"]
    assert head.part.times.wait == pytest.approx(0.2)     # first found waiting at 0.1, due at 0.3
    # "b" has one later part of its recipe; it waits until 0.1 + max_ms.
    assert window.due(0.59) is None
    b = window.due(0.61)
    assert b.part.part_id == "b" and b.part.times.wait == pytest.approx(0.02)   # oldest from 0.59 only


def test_the_deadline_bounds_the_wait_and_an_ending_line_decides_everything():
    window = LookAheadWindow(lambda recipe: LookAheadSettings(parts=8, max_ms=5000, margin_ms=100),
                             initial_scoring_s=0.05)
    window.record_scoring(0.3)                              # the slowest recent scoring time is kept free
    window.add(_part("a", "r", capture=0.0, deadline=1.0), extracted="A")
    assert window.due(0.59) is None and window.due(0.61) is not None   # 1.0 - 0.3 - 0.1
    window.add(_part("b", "r", capture=1.0, deadline=5.0), extracted="B")
    window.add(_part("c", "r", capture=1.1, deadline=5.1), extracted=None)   # cannot be scored: no reference
    assert [w.part.part_id for w in iter(lambda: window.due(1.2, ending=True), None)] == ["b", "c"]


def test_look_ahead_off_or_an_unscorable_part_is_decided_at_once():
    window = LookAheadWindow(lambda recipe: LookAheadSettings(parts=0))
    window.add(_part("a", "r", capture=0.0, deadline=9.0), extracted="A")
    assert window.due(0.0).part.part_id == "a"
    window = LookAheadWindow(lambda recipe: LookAheadSettings(parts=4))
    window.add(_part("a", "r", capture=0.0, deadline=9.0), extracted=None)
    assert window.due(0.0).part.part_id == "a"


def test_a_part_seen_twice_is_never_its_own_look_ahead_reference():
    window = LookAheadWindow(lambda recipe: LookAheadSettings(parts=1))
    window.add(_part("a", "r", capture=0.0, deadline=9.0), extracted="A")
    window.add(_part("a", "r", capture=0.1, deadline=9.1), extracted="A again")
    head = window.due(0.2)
    assert head is None or window.references(head) == []


def test_coverage_eviction_replaces_the_most_redundant_older_member_not_the_oldest():
    pool = FeaturePool(4, N_SETS, P, D, min_size=2, eviction="coverage")
    look_alike, distinct = parts(2, seed=1), parts(3, seed=2, noise=0.0)
    other = [np.roll(s, 3, axis=1) for s in distinct[2]]           # another "pose": other prototypes
    pool.admit("old-distinct", other, 0.0, other[1][0])
    pool.admit("twin-1", look_alike[0], 0.0, look_alike[0][1][0])
    pool.admit("twin-2", look_alike[0], 0.0, look_alike[0][1][0])   # the same look as twin-1
    pool.admit("new", distinct[0], 0.0, distinct[0][1][0])
    slot = pool.admit("newest", distinct[1], 0.0, distinct[1][1][0])
    assert "old-distinct" in pool.part_ids                          # FIFO would have evicted it
    assert pool.part_ids[slot] == "newest" and sorted(p for p in pool.part_ids if p.startswith("twin")) in (
        ["twin-1"], ["twin-2"])


def test_the_status_reports_the_latency_the_line_needs_without_its_look_ahead_wait():
    """`musc-calibrate timing set` checks a delay against this: a part waits for later parts only as long as its
    deadline allows, so the wait is not latency the line needs (a shorter delay shortens it)."""
    from musc_edge.edge.record import PartRecord, Reason, Verdict
    from musc_edge.edge.runtime.calibration_state import Authorised
    from musc_edge.edge.runtime.in_force import InForce
    from musc_edge.edge.runtime.live_status import LineStats, control_status

    stats = LineStats()
    for k, (total, wait) in enumerate([(1.10, 0.95), (1.20, 1.00), (1.05, 0.90), (0.30, 0.0)]):
        part = PartRecord(part_id=f"p{k}", recipe="r", capture_time=0.0).decide(Verdict.ACCEPT, Reason.OK)
        part.times.total, part.times.wait = total, wait
        stats.count(part)
    reply = control_status("l", InForce.of(Authorised(None), False), {}, stats, None, 0, "/tmp")["stats"]
    assert reply["latency_ms"]["max"] == pytest.approx(1200.0)
    assert reply["latency_needed_ms"]["max"] == pytest.approx(300.0)    # the part that did not wait
    assert reply["latency_needed_ms"]["p50"] == pytest.approx(175.0)    # median of 150, 200, 150, 300
