"""musc-calibrate's decisions on plain values: pool selections, calibrated thresholds, rollback targets,
change preconditions, reject timing, confirmed parts and the expected-rate table."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from musc_edge.calibration.decisions import (Candidate, calibrate, check_assumptions, check_delivery, expected_rates,
                                             given_threshold, labelled_scores, latency_problem,
                                             ledger_calibration_scores, merged_timing, pool_calibration_scores,
                                             pool_selection, previous_version, rate_still_holds, require_reason,
                                             rollback_target, version_creators)
from musc_edge.calibration.thresholds import MIN_SCORES, fit_threshold
from musc_edge.edge.errors import UsageError
from musc_edge.edge.record import MAX_THRESHOLD

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


RECORDS = [
    {"seq": 1, "action": "threshold.apply", "old": {"version": 0}, "new": {"version": 1, "file_sha256": "a"}},
    {"seq": 2, "result_of": 1, "new": {"ok": True}},
    {"seq": 3, "action": "rollback", "old": {"version": 1}, "new": {"version": 0, "file_sha256": "b"}},
    {"seq": 4, "result_of": 3, "new": {"ok": True}},
    {"seq": 5, "action": "rollback", "old": {"version": 0}, "new": {"version": 1, "file_sha256": "a"}},
]


def test_rollback_goes_to_the_version_asked_for_or_the_one_before_and_never_to_itself():
    assert rollback_target(None, 1, RECORDS[:2]) == 0
    assert rollback_target(3, 1, RECORDS) == 3
    assert rollback_target(2, None, RECORDS) == 2           # current.json unreadable: only an explicit target
    with pytest.raises(UsageError, match="give --to N: the version in force is unknown"):
        rollback_target(None, None, RECORDS)
    with pytest.raises(UsageError, match="no earlier version is recorded before v5"):
        rollback_target(None, 5, RECORDS)
    with pytest.raises(UsageError, match="version 1 is already in force"):
        rollback_target(1, 1, RECORDS)


def test_a_version_is_credited_to_the_record_that_first_wrote_it():
    created = version_creators(RECORDS)
    assert {v: r["seq"] for v, r in created.items()} == {1: 1, 0: 3}


def test_a_change_needs_a_reason_and_the_right_line_state():
    assert require_reason("  new batch of caps ") == "new batch of caps"
    for reason in (None, "", "   "):
        with pytest.raises(UsageError, match="needs --reason"):
            require_reason(reason)
    sock = Path("/run/line/control.sock")
    check_delivery(stage=False, running=True, socket=sock)
    check_delivery(stage=True, running=False, socket=sock)
    with pytest.raises(UsageError, match="the line is running .*without --stage"):
        check_delivery(stage=True, running=True, socket=sock)
    with pytest.raises(UsageError, match="no running line answers on /run/line/control.sock.*--stage"):
        check_delivery(stage=False, running=False, socket=sock)


def test_timing_set_keeps_what_it_is_not_told_and_is_time_or_encoder_mode_never_both():
    current = {"mode": "time", "delay_ms": 300.0, "counts": None, "actuator_lead_ms": 50.0}
    assert merged_timing(200.0, None, None, current) == {"mode": "time", "delay_ms": 200.0, "counts": None,
                                                         "actuator_lead_ms": 50.0}   # the lead is kept
    assert merged_timing(None, None, 20.0, current)["delay_ms"] == 300.0            # the delay is kept
    assert merged_timing(None, 800, None, current) == {"mode": "encoder", "counts": 800, "delay_ms": None,
                                                       "actuator_lead_ms": 50.0}
    assert merged_timing(120.0, None, None, None)["actuator_lead_ms"] == 0.0
    with pytest.raises(UsageError, match="not both"):
        merged_timing(120.0, 800, None, current)
    with pytest.raises(UsageError, match="no reject timing is set yet"):
        merged_timing(None, None, 5.0, None)


def test_a_delay_that_leaves_less_than_the_measured_p99_plus_a_margin_is_a_problem():
    timing = {"mode": "time", "delay_ms": 200.0, "actuator_lead_ms": 0.0}
    assert "p99 latency is 282 ms" in latency_problem(timing, 282.0)
    assert latency_problem(timing, 150.0) is None                 # 150 + 30 margin <= 200
    assert latency_problem(timing, 170.0) is not None             # 170 + 34 > 200
    assert latency_problem({**timing, "actuator_lead_ms": 60.0}, 150.0) is not None   # the lead counts too
    assert latency_problem(timing, None) is None and latency_problem({"mode": "encoder", "counts": 5}, 900.0) is None


def test_the_label_free_estimate_refuses_a_mostly_rejected_stream_and_too_few_parts():
    rng = np.random.default_rng(4)
    mostly_bad = np.concatenate([rng.gumbel(0.3, 0.05, 24), rng.uniform(1.5, 9.0, 76)])   # 76 % defective
    with pytest.raises(UsageError, match="76 % of the stream score at or above the threshold in force"):
        check_assumptions(mostly_bad, 1.0, "the stream")
    check_assumptions(mostly_bad[:40], None, "the stream")        # no threshold in force: nothing to compare
    with pytest.raises(UsageError, match="19 scores are too few"):
        check_assumptions(rng.gumbel(0.3, 0.05, 19), 1.0, "the stream")
    check_assumptions(rng.gumbel(0.3, 0.05, 100), 1.0, "the stream")


def test_a_tested_rate_holds_within_a_factor_of_two():
    assert rate_still_holds(0.01, 0.015) and rate_still_holds(0.01, 0.006)
    assert not rate_still_holds(0.01, 0.03) and not rate_still_holds(0.01, 0.003)
    assert rate_still_holds(0.0, 0.00005)                          # two negligible rates are the same


def test_calibration_scores_are_refused_below_the_minimum_and_a_typed_threshold_must_be_finite_and_in_range():
    scores, described = pool_calibration_scores(np.ones(MIN_SCORES), "r")
    assert scores.size == MIN_SCORES and described == f"{MIN_SCORES} pool members' leave-one-out scores"
    with pytest.raises(UsageError, match=f"pool 'r' is too small.*{MIN_SCORES - 1} members"):
        pool_calibration_scores(np.ones(MIN_SCORES - 1), "r")
    with pytest.raises(UsageError, match="only 3 scored parts of recipe 'r' among the last 50"):
        ledger_calibration_scores([0.1, 0.2, 0.3], "r", 50)
    assert given_threshold(0.5) == 0.5
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="--threshold must be a finite number"):
            given_threshold(bad)
    assert given_threshold(MAX_THRESHOLD) == MAX_THRESHOLD
    for bad in (0.0, -1.0, MAX_THRESHOLD * 1.01):   # the line would refuse these after the confirmation
        with pytest.raises(UsageError, match=re.escape(f"--threshold must be above 0 and at most {MAX_THRESHOLD:g}")):
            given_threshold(bad)


def test_confirmed_parts_need_a_ledger_score_for_the_recipe():
    row = lambda score, recipe="r": SimpleNamespace(score=score, recipe=recipe)   # noqa: E731
    assert labelled_scores({"p1": [row(0.9), row(0.4)]}, "r", Path("l.sqlite")) == {"p1": 0.4}   # newest row
    with pytest.raises(UsageError, match="unknown part id\\(s\\) p2: not in the ledger l.sqlite"):
        labelled_scores({"p1": [row(0.4)], "p2": []}, "r", Path("l.sqlite"))
    with pytest.raises(UsageError, match="part\\(s\\) p1, p3 have no score for recipe 'r'"):
        labelled_scores({"p1": [row(None)], "p3": [row(0.2, "other")]}, "r", Path("l.sqlite"))


def test_expected_rates_compare_the_current_threshold_with_the_candidate():
    scores = np.linspace(0.0, 1.0, 101)
    fit = fit_threshold(scores, 0.05, "empirical")
    cand = Candidate("r", 0.9, 0.5, "pool", fit=fit, scores=scores)
    rows = dict((what, (now, new)) for what, now, new in expected_rates(cand, [0.1, 0.6, 0.95, 0.2]))
    assert rows["rejected among the calibration scores"] == (" 50.50 %", " 10.89 %")
    assert rows["rejected among the last 4 scored parts"] == (" 50.00 %", " 25.00 %")
    # Ledger-calibrated: the calibration scores are the recent parts, so they are not listed twice.
    ledger = Candidate("r", 0.9, None, "ledger", fit=fit, scores=scores)
    table = expected_rates(ledger, [])
    assert [what for what, _, _ in table] == ["modelled false-reject rate, good parts"] and table[0][1] == "-"
    assert expected_rates(Candidate("r", 0.9, 0.5, "given"), []) == []
