"""musc-calibrate's decisions on plain values: pool selections, calibrated thresholds, rollback targets."""
from __future__ import annotations

import numpy as np
import pytest

from calibration.client import UsageError
from calibration.decisions import calibrate, pool_selection, previous_version

MEMBERS = [{"part_id": "a", "golden": False}, {"part_id": "b", "golden": True}, {"part_id": "c", "golden": False}]


def test_pool_selection_checks_named_members_and_never_purges_golden_ones():
    assert pool_selection(MEMBERS, "freeze", "r", part_ids=["a", "b"]) == {"part_ids": ["a", "b"]}
    with pytest.raises(UsageError, match="not members of pool 'r': zz"):
        pool_selection(MEMBERS, "purge", "r", part_ids=["a", "zz"])
    with pytest.raises(UsageError, match="golden members are never purged: b"):
        pool_selection(MEMBERS, "purge", "r", part_ids=["b"])
    assert pool_selection(MEMBERS, "purge", "r", highest=2) == {"highest": 2}
    assert pool_selection(MEMBERS, "freeze", "r", lowest=1) == {"lowest": 1}
    assert pool_selection(MEMBERS, "unfreeze", "r") == {"all": True}


def test_confirmed_parts_move_a_calibrated_threshold_by_a_bounded_step():
    scores = np.random.default_rng(0).normal(1.0, 0.1, 400)
    fit, refinement, threshold = calibrate(scores, 0.01, "mad", {}, {})
    assert refinement is None and threshold == fit.threshold and threshold > np.quantile(scores, 0.9)
    # A confirmed defect just below the threshold pulls it down to a quarter of the scale below that part.
    bad = {"p1": fit.threshold - 0.01}
    _, refinement, lowered = calibrate(scores, 0.01, "mad", {}, bad)
    assert refinement.changed and lowered == pytest.approx(bad["p1"] - 0.25 * fit.scale)


def test_rollback_target_is_the_version_before_the_last_successful_change():
    records = [
        {"seq": 1, "action": "threshold.apply", "old": {"version": 0}, "new": {"version": 1}},
        {"seq": 2, "result_of": 1, "new": {"ok": True}},
        {"seq": 3, "action": "threshold.apply", "old": {"version": 1}, "new": {"version": 2}},   # never succeeded
        {"seq": 4, "action": "timing.set", "old": {"version": 1}, "new": {"version": 2}},
        {"seq": 5, "result_of": 4, "new": {"ok": True}},
    ]
    assert previous_version(records, 2) == 1
    assert previous_version(records, 1) == 0
    assert previous_version(records, 7) is None
