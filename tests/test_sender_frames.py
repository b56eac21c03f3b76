"""Numbered ZeroMQ frames: which ones never arrived (edge_app/sources/sender_frames.py)."""
from __future__ import annotations

import pytest

from musc_edge.edge.sources.sender_frames import (Arrival, LossBudget, SenderFrames, frame_number, frame_ref,
                                                     parse_frame_ref)


@pytest.mark.parametrize("arrivals, lost, skipped, missing, restarts", [
    # (sender, frame id, broken connections the source had seen[, of them surely before the frame was sent])
    ([("a", 1, 0), ("a", 2, 0), ("a", 3, 0)], [[], [], []], [[], [], []], 0, 0),       # in order
    ([("a", 1, 0), ("a", 4, 1)], [[], [2, 3]], [[], []], 2, 0),                         # two lost with a connection
    ([("a", 1, 0), ("a", 4, 0)], [[], []], [[], [2, 3]], 0, 0),                         # skipped, nothing broke
    ([("a", 5, 0), ("a", 6, 0)], [[], []], [[], []], 0, 0),                             # first heard of at 5
    ([("a", 9, 0), ("a", 1, 1), ("a", 3, 2)], [[], [], [2]], [[], [], []], 1, 1),       # a restart, then a loss
    ([("a", 1, 0), ("b", 7, 0), ("a", 2, 1), ("b", 9, 1)], [[], [], [], [8]], [[], [], [], []], 1, 0),  # apart
    ([("a", 1, 0), ("b", 1, 1), ("a", 3, 1)], [[], [], [2]], [[], [], []], 1, 0),       # any break since a's last
    ([("a", 3, 0), ("a", 3, 1)], [[], []], [[], []], 0, 1),                             # a repeated id loses nothing
    ([("a", 1, 1, 0), ("a", 3, 1)], [[], [2]], [[], []], 1, 0),     # a break noticed as frame 1 was read: after it?
])
def test_observe_names_the_lost_and_the_skipped_ids(arrivals, lost, skipped, missing, restarts):
    frames = SenderFrames()
    seen = [frames.observe(*arrival) for arrival in arrivals]
    assert [list(a.lost) for a in seen] == lost and [list(a.skipped) for a in seen] == skipped
    assert [a.restarted for a in seen].count(True) == restarts
    assert (frames.missing, frames.restarts) == (missing, restarts)


def test_the_least_recently_heard_sender_is_forgotten_first():
    frames = SenderFrames(max_senders=2)
    frames.observe("a", 1, 0), frames.observe("b", 1, 0), frames.observe("a", 2, 0), frames.observe("c", 1, 0)
    assert list(frames.observe("a", 4, 1).lost) == [3]   # a was kept
    assert frames.observe("b", 5, 1) == Arrival(range(0))  # b was forgotten: 5 starts it again, no loss claimed


@pytest.mark.parametrize("header, expected", [
    ({}, None),
    ({"sender": "cam1"}, None),
    ({"frame_id": 0}, ("", 0)),
    ({"frame_id": 2 ** 63 - 1, "sender": "cam1"}, ("cam1", 2 ** 63 - 1)),
])
def test_frame_number_of_a_header(header, expected):
    assert frame_number(header) == expected


@pytest.mark.parametrize("header, message", [
    ({"frame_id": -1}, "'frame_id' must be an integer in 0..2^63-1, got -1"),
    ({"frame_id": 2 ** 63}, "'frame_id' must be an integer"),
    ({"frame_id": True}, "'frame_id' must be an integer"),
    ({"frame_id": "7"}, "got '7'"),
    ({"frame_id": 1, "sender": 5}, "'sender' must be printable text"),
    ({"frame_id": 1, "sender": "a\nb"}, "'sender' must be printable text"),
    ({"frame_id": 1, "sender": "x" * 49}, "at most 48 characters"),
])
def test_frame_number_names_the_bad_field(header, message):
    with pytest.raises(ValueError, match=message.replace("^", r"\^").replace("(", r"\(")):
        frame_number(header)


@pytest.mark.parametrize("ref, expected", [
    (frame_ref("cam-1", 17), ("cam-1", 17)),
    (frame_ref("a/b", 3), ("a/b", 3)),                  # the id is after the last slash
    ("zmq:P17", None),                                  # an unnumbered ZeroMQ part
    ("zmq://cam/x", None), ("zmq://cam/", None), ("zmq://cam/\u0663", None),   # \u0663: a digit, not ASCII
    ("/data/bottle/000.png", None), (None, None), ("", None),
])
def test_frame_ref_round_trip(ref, expected):
    assert parse_frame_ref(ref) == expected


def test_resume_takes_each_senders_newest_id_from_the_ledger():
    frames = SenderFrames()
    refs = [frame_ref("a", 5), "zmq:P9", None, frame_ref("b", 2), frame_ref("a", 7), frame_ref("a", 6)]
    assert frames.resume(refs) == 2
    assert list(frames.observe("a", 10, 0).lost) == [8, 9]   # 7 was the last the ledger recorded; the line's
    assert frames.observe("b", 3, 0) == Arrival(range(0))     # stop broke the connection, no event needed
    assert list(frames.observe("a", 12, 0).skipped) == [11]   # from now on, a gap needs a broken connection
    assert frames.missing == 2
    assert len(frame_ref("x" * 48, 2 ** 63 - 1)) <= 80  # fits a source_ref


def test_loss_budget_grants_rows_within_its_window_and_frees_them_after():
    budget = LossBudget(rows=5, window_s=60.0)
    assert [budget.take(n, t) for n, t in [(2, 0.0), (3, 10.0), (1, 20.0), (6, 70.0), (2, 70.0), (3, 70.5)]] == \
        [True, True, False, False, True, True]   # full at 10 s; at 70 s the first 2 are free again (3 + 2)
    assert budget.take(1, 70.9) is False and budget.take(5, 131.0) is True
