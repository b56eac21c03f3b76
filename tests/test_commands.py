"""Which pool members a control command acts on: resolved in one place for the line and the client."""
from __future__ import annotations

import numpy as np
import pytest

from musc_edge.edge.runtime.commands import SelectionError, select_members

IDS = ["a", "b", "c", "d", "e", None, None]
RAW = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.0, 0.0])
GOLDEN = np.array([False, True, False, False, False, False, False])


def chosen(request: dict) -> list[str]:
    return [IDS[i] for i in select_members(IDS[:5], RAW, GOLDEN, request)]


def test_highest_are_the_ordinary_members_with_the_largest_raw_scores():
    assert chosen({"highest": 2}) == ["d", "a"]          # b scores higher but is golden


def test_lowest_are_the_members_with_the_smallest_raw_scores():
    assert chosen({"lowest": 3}) == ["c", "e", "a"]


def test_all_is_the_ordinary_members_unless_golden_ones_are_included():
    assert chosen({"all": True}) == ["a", "c", "d", "e"]
    assert chosen({"all": True, "include_golden": True}) == ["a", "b", "c", "d", "e"]


def test_part_ids_must_all_be_members():
    assert chosen({"part_ids": ["e", "a"]}) == ["a", "e"]
    with pytest.raises(SelectionError, match="'zz'"):
        chosen({"part_ids": ["a", "zz"]})
