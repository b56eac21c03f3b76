"""bench/soak.py's bookkeeping: which ledger row is which sent message, and which NO_VERDICT rows are explained."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from musc_edge.edge.record import Reason, Verdict

from .hostile import UNREADABLE_DETAIL

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[1] / "bench" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def row(part_id: str, reason: Reason, detail: str = "") -> SimpleNamespace:
    verdict = {Reason.OK: Verdict.ACCEPT, Reason.ANOMALY: Verdict.REJECT}.get(reason, Verdict.NO_VERDICT)
    return SimpleNamespace(part_id=part_id, reason=reason, verdict=verdict, detail=detail)


def test_unreadable_rows_are_keyed_by_their_order_not_by_the_counter_id_a_restart_reuses():
    unreadable = f"{UNREADABLE_DETAIL}: 200,000 bytes of JSON"
    rows = [row("S000000", Reason.OK), row("part000001", Reason.DECODE_ERROR, unreadable),
            row("part000001", Reason.DECODE_ERROR, unreadable), row("S000003", Reason.OK)]
    assert soak.row_keys(rows) == ["S000000", f"{soak.UNREADABLE}0", f"{soak.UNREADABLE}1", "S000003"]


def test_a_no_verdict_row_is_explained_by_its_hostile_kind_or_a_warm_up_on_a_small_pool_only():
    rows = [row("S0", Reason.WARMUP), row("S1", Reason.OK), row("S2", Reason.WARMUP),          # run 1
            row("S3", Reason.DECODE_ERROR), row("S4", Reason.SCANNER_ERROR),
            row("S5", Reason.WARMUP), row("S6", Reason.ANOMALY),                               # run 2: full pool
            row("S7", Reason.WARMUP), row("S8", Reason.OK), row("S9", Reason.DEADLINE)]        # run 3: empty pool
    expected = {"S0": None, "S1": None, "S2": None, "S3": "jpeg_bomb", "S4": "jpeg_bomb", "S5": None,
                "S6": None, "S7": None, "S8": None, "S9": None}
    segments = [(0, 0), (5, soak.MIN_SIZE), (7, 0)]
    explained = {r.part_id: why for r, why in soak.explain(rows, soak.row_keys(rows), expected, segments)}
    assert explained == {"S0": "warmup", "S2": None, "S3": "hostile:jpeg_bomb", "S4": None, "S5": None,
                         "S7": "warmup", "S9": None}
