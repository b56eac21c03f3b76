"""The hostile messages of the soak's mix (tests/hostile.py HOSTILE_KINDS) on a running line: each one is one
NO_VERDICT row, under the id and with the reason the catalogue says (the soak explains its NO_VERDICT rows
with them), and the line goes on: every part has one row and one acknowledged verdict."""
from __future__ import annotations

from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import Verdict

from .hostile import (HOSTILE_KINDS, UNREADABLE_DETAIL, LiveLine, assert_one_row_and_ack_each, hostile_message,
                      line_config, png)


def test_every_hostile_kind_is_the_no_verdict_row_the_catalogue_names(toy_model, tmp_path):
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        live = LiveLine(line_config(toy_model, tmp_path / "line", plc.address))
        sent = []
        for k, kind in enumerate(HOSTILE_KINDS):
            live.send(png(k), part_id=f"G{k}")
            message = hostile_message(kind, png(100 + k), f"H{k}")
            live.send_raw(message.frames)
            sent.append(message)
        live.send(png(99), part_id="LAST")
        live.wait_parts(2 * len(HOSTILE_KINDS) + 1)
        rows = live.stop()
        assert_one_row_and_ack_each(rows, plc)
    assert [r.part_id for r in rows[0::2]] == [f"G{k}" for k in range(len(HOSTILE_KINDS))] + ["LAST"]
    for message, row in zip(sent, rows[1::2]):
        assert row.verdict == Verdict.NO_VERDICT and row.reason == message.reason, (message.kind, row.detail)
        if message.row_id is None:
            assert row.detail.startswith(UNREADABLE_DETAIL), (message.kind, row.detail)
            assert row.part_id.startswith("part"), (message.kind, row.part_id)
        else:
            assert row.part_id == message.row_id, (message.kind, row.part_id, row.detail)
            assert not row.detail.startswith(UNREADABLE_DETAIL), (message.kind, row.detail)
