"""Numbered ZeroMQ frames: which ones never arrived (edge_app/sources/sender_frames.py)."""
from __future__ import annotations

import pytest

from musc_edge.edge.sources.sender_frames import SenderFrames, frame_number, frame_ref, parse_frame_ref


@pytest.mark.parametrize("arrivals, lost, missing, restarts", [
    ([("a", 1), ("a", 2), ("a", 3)], [[], [], []], 0, 0),                       # in order
    ([("a", 1), ("a", 4)], [[], [2, 3]], 2, 0),                                 # two dropped
    ([("a", 5), ("a", 6)], [[], []], 0, 0),                                     # first heard of at 5: no loss
    ([("a", 9), ("a", 1), ("a", 3)], [[], [], [2]], 1, 1),                      # counting again after a restart
    ([("a", 1), ("b", 7), ("a", 2), ("b", 9)], [[], [], [], [8]], 1, 0),        # senders counted apart
    ([("a", 3), ("a", 3)], [[], []], 0, 1),                                     # a repeated id loses nothing
])
def test_observe_names_the_skipped_ids(arrivals, lost, missing, restarts):
    frames = SenderFrames()
    assert [list(frames.observe(s, f)) for s, f in arrivals] == lost
    assert (frames.missing, frames.restarts) == (missing, restarts)


def test_the_least_recently_heard_sender_is_forgotten_first():
    frames = SenderFrames(max_senders=2)
    frames.observe("a", 1), frames.observe("b", 1), frames.observe("a", 2), frames.observe("c", 1)
    assert list(frames.observe("a", 4)) == [3]       # a was kept
    assert list(frames.observe("b", 5)) == []        # b was forgotten: 5 starts it again, no loss claimed


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
    assert list(frames.observe("a", 10)) == [8, 9]      # 7 was the last the ledger recorded
    assert list(frames.observe("b", 3)) == []
    assert frames.missing == 2
    assert len(frame_ref("x" * 48, 2 ** 63 - 1)) <= 80  # fits a source_ref
