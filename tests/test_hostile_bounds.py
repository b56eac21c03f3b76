"""Issue 21, rows 1, 2, 3, 9, 16, 17, 19 on a running line: hostile ZeroMQ frames on a real socket on
127.0.0.1, a PLC simulator acknowledging, the archive on, the operator view over the storage afterwards,
a restart on a damaged pool file. Each hostile message is a NO_VERDICT row and the line goes on; every
part has one row and one acknowledged verdict."""
from __future__ import annotations

import json
import time

import pytest
from starlette.testclient import TestClient

from musc_edge.edge.config import ViewSettings, parse_config
from musc_edge.edge.errors import UsageError
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import Reason, Verdict
from musc_edge.edge.runtime.line import Line
from musc_edge.edge.runtime.pool_store import pool_path, previous_path
from musc_edge.edge.runtime.status import format_status, line_status
from musc_edge.edge.view.app import create_app
from musc_edge.edge.view.server import view_options

from .hostile import LiveLine, assert_one_row_and_ack_each, jpeg_with_sof, line_config, png


@pytest.fixture
def plc():
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as sim:
        yield sim


def test_rows_1_2_3_16_19_hostile_frames_are_no_verdict_rows_and_the_line_goes_on(toy_model, tmp_path, plc):
    raw = line_config(toy_model, tmp_path / "line", plc.address)
    raw["storage"]["archive"] = {"enabled": True}   # warm-up parts are NO_VERDICT: every one is archived
    live = LiveLine(raw)
    same_ms = time.time()
    live.send(png(12), part_id="LOT/7", capture_time=same_ms)                  # row 16: one archive name before
    live.send(png(13), part_id="LOT 7", capture_time=same_ms)
    live.send(png(0), part_id="G0")
    live.wait_parts(3)
    cloud_header = {"encoding": "png", "part_id": "EVIL1", "cloud_shape": [2 ** 32, 2 ** 32, 3],
                    "cloud_dtype": "float32"}
    live.send_raw([json.dumps(cloud_header).encode(), png(10), b""])            # row 1: product wraps to 0
    live.send_raw([b"[" * 100_000 + b"]" * 100_000, png(11)])                  # row 2: RecursionError before
    live.send_raw([b"[" * 10_000 + b"]" * 10_000, png(11)])                    # under the size limit: depth
    live.send(jpeg_with_sof(32767, 32767), part_id="BOMB", encoding="jpeg")    # row 3: SOF behind a stray byte
    for k in range(3, 5):
        live.send(png(k), part_id=f"G{k}")
    live.wait_parts(9)
    assert live.thread.is_alive() and live.error is None
    rows = live.stop()
    assert len(rows) == 9 and [r.part_id for r in rows][-2:] == ["G3", "G4"]
    assert_one_row_and_ack_each(rows, plc)
    by_id = {r.part_id: r for r in rows}
    assert (by_id["EVIL1"].verdict, by_id["EVIL1"].reason) == (Verdict.NO_VERDICT.value, Reason.SCANNER_ERROR.value)
    assert "cloud_shape" in by_id["EVIL1"].detail
    assert rows[4].verdict == Verdict.NO_VERDICT.value and "200,000 bytes of JSON, over the limit" in rows[4].detail
    assert rows[5].verdict == Verdict.NO_VERDICT.value and "nested 10000 levels deep" in rows[5].detail
    assert by_id["LOT/7"].reason == by_id["LOT 7"].reason == Reason.WARMUP.value   # archived: NO_VERDICT
    assert by_id["BOMB"].verdict == Verdict.NO_VERDICT.value and "over the pixel budget" in by_id["BOMB"].detail

    settings = ViewSettings()
    with TestClient(create_app(view_options(tmp_path / "line", None, settings, "bounds"))) as client:
        images = [client.get(f"/archive/{by_id[p].seq}/image") for p in ("LOT/7", "LOT 7")]
        assert [r.status_code for r in images] == [200, 200]
        assert images[0].content != images[1].content                        # row 16: two files, not one
        for url in ("/archive/99999999999999999999/thumb", "/archive/9223372036854775808/image",  # row 19
                    "/part/99999999999999999999999", "/api/part/18446744073709551616"):
            assert client.get(url).status_code == 404, url


def test_row_17_a_truncated_pool_file_restarts_on_the_previous_one_with_an_alarm(toy_model, tmp_path, plc):
    raw = line_config(toy_model, tmp_path / "line", plc.address)
    live = LiveLine(raw)
    for k in range(8):
        live.send(png(k), part_id=f"W{k}")
    live.wait_parts(8)
    live.stop()                  # saves the pool
    live = LiveLine(raw)
    live.send(png(9), part_id="W9")
    live.wait_parts(1)
    live.stop()                  # saves it again: the first file is kept as the previous one
    path = pool_path(tmp_path / "line", "default")
    assert previous_path(path).is_file()
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    shown = format_status(line_status(tmp_path / "line"))   # musc-edge status, the line stopped
    assert "pool default    DAMAGED file (BadZipFile" in shown


    live = LiveLine(raw)   # before: BadZipFile traceback at every start
    assert any("damaged" in text and "restored the previous pool file" in text for text in live.line.stats.alarms)
    assert live.line.restored["default"] >= 4      # min_size: the restored pool is ready, no warm-up
    live.send(png(20), part_id="after")
    live.wait_parts(1)
    rows = live.stop()
    assert rows[-1].part_id == "after" and rows[-1].reason != Reason.WARMUP.value
    assert_one_row_and_ack_each(rows, plc)


def test_row_9_a_model_size_that_is_no_multiple_of_the_patch_size_is_one_line_at_start(toy_model, tmp_path, plc):
    raw = line_config(toy_model, tmp_path / "line", plc.address)
    raw["model"]["size"] = 225
    config = parse_config(raw)     # the config cannot know the model's patch size; its manifest does
    with pytest.raises(UsageError, match="225 is not a multiple of the patch size 14") as err:
        Line(config)
    assert "\n" not in str(err.value)


def test_row_3_a_reseed_folder_holding_the_jpeg_bomb_is_refused_before_the_pool_changes(toy_model, tmp_path, plc):
    from musc_edge.edge.runtime.control import ControlError

    line = Line(parse_config(line_config(toy_model, tmp_path / "line", plc.address)))
    pool = line.inspector.recipes["default"].pool
    before = pool.size
    folder = tmp_path / "seed"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(png(i))
    (folder / "4.jpg").write_bytes(jpeg_with_sof(32767, 32767))   # before: 23 s and 6.6 GB in libjpeg
    with pytest.raises(ControlError, match="4.jpg.*over the pixel budget"):
        line._handle_control({"cmd": "pool_reseed", "recipe": "default", "folder": str(folder)})
    assert pool.size == before
