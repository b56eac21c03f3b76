"""Reject timing: when each part's verdict must reach the PLC, in delay and encoder modes."""
from __future__ import annotations

import pytest

from musc_edge.edge.runtime.calibration_state import RejectTiming
from musc_edge.edge.runtime.deadline import DeadlineClock


def test_without_reject_timing_the_line_budget_applies():
    clock = DeadlineClock(1.5)
    assert clock.deadline(100.0) == pytest.approx(101.5)
    assert clock.deadline(100.0, encoder=5000) == pytest.approx(101.5)


def test_time_mode_is_the_delay_less_the_actuator_lead():
    clock = DeadlineClock(1.5, RejectTiming(mode="time", delay_ms=800, actuator_lead_ms=50))
    assert clock.deadline(10.0) == pytest.approx(10.75)


def test_encoder_mode_learns_the_belt_speed_and_falls_back_until_it_knows_it():
    clock = DeadlineClock(1.5, RejectTiming(mode="encoder", counts=2000, actuator_lead_ms=100))
    assert clock.deadline(0.0, encoder=0) == pytest.approx(1.5)           # one stamp: no speed yet
    assert clock.deadline(1.0, encoder=1000) == pytest.approx(1.0 + 2.0 - 0.1)   # 1000 counts/s
    assert clock.deadline(2.0) == pytest.approx(2.0 + 2.0 - 0.1)          # no stamp: the last speed
    # The belt doubles its speed: the estimate moves a fifth of the way per part, toward 2000 counts/s.
    clock.deadline(3.0, encoder=5000)                                     # 2000 counts/s since t=1
    assert clock.counts_per_s == pytest.approx(1200.0)
    for k in range(1, 40):
        clock.deadline(3.0 + k, encoder=5000 + 2000 * k)
    assert clock.counts_per_s == pytest.approx(2000.0, rel=1e-3)
    assert clock.deadline(50.0, encoder=5000 + 2000 * 47) == pytest.approx(50.0 + 1.0 - 0.1, rel=1e-3)


def test_a_stopped_or_reversed_belt_does_not_corrupt_the_speed():
    clock = DeadlineClock(1.5, RejectTiming(mode="encoder", counts=500))
    clock.deadline(0.0, encoder=0)
    clock.deadline(1.0, encoder=500)                                       # 500 counts/s
    clock.deadline(2.0, encoder=500)                                       # stopped: rate 0, ignored
    clock.deadline(3.0, encoder=100)                                       # wrapped/reversed: ignored
    clock.deadline(3.0, encoder=900)                                       # same timestamp: ignored
    assert clock.counts_per_s == pytest.approx(500.0)


def test_calibration_can_switch_the_mode_of_a_running_clock():
    clock = DeadlineClock(1.5)
    clock.timing = RejectTiming(mode="time", delay_ms=400)
    assert clock.deadline(0.0) == pytest.approx(0.4)
    clock.timing = None
    assert clock.deadline(0.0) == pytest.approx(1.5)
