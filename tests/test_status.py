"""`musc-edge status` (issue 25 row 11): while a line runs, its pools are the ones the line holds (they used to be
`"pools": {}` until the first periodic save, while the line's own status showed `pool default 27/40`)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from musc_edge.edge.cli import main
from musc_edge.edge.config import parse_config
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.runtime.line import Line
from musc_edge.edge.runtime.status import format_status, line_status

from .test_line_faults import ScriptedSource
from .test_runtime import make_parts, raw_config

pytestmark = pytest.mark.timeout(120)


def test_status_of_a_running_line_shows_its_live_pools_then_the_saved_ones(toy_model, tmp_path, capsys):
    files = sorted(make_parts(tmp_path / "parts", 8).glob("*/*.png"))
    storage = tmp_path / "line"
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        raw = raw_config(toy_model, tmp_path / "parts" / "test", storage, {"type": "zmq", "endpoint": plc.address})
        raw["recipes"]["default"]["pool"]["persist_every_s"] = 3600   # no periodic save while this test runs
        source = ScriptedSource(files)
        line = Line(parse_config(raw), source=source)
        runner = threading.Thread(target=line.run, daemon=True)
        runner.start()
        try:
            assert source.exhausted.wait(60)
            deadline = time.monotonic() + 30
            while line.stats.parts < len(files) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not (storage / "pools" / "default.npz").exists()
            held = line.inspector.recipes["default"].pool
            assert main(["status", "--dir", str(storage), "--json"]) == 0
            status = json.loads(capsys.readouterr().out)
            assert status["running"] is True
            pool = status["pools"]["default"]
            assert (pool["size"], pool["capacity"], pool["live"]) == (held.size, 10, True) and held.size >= 4
            assert status["live"]["calibration_version"] == "0" and status["live"]["link"]["connected"] is True
            text = format_status(status)
            assert f"pool default    {held.size}/10 members (live), oldest " in text and ", newest " in text
        finally:
            line.stop()
            runner.join(30)
    stopped = line_status(storage)
    assert stopped["running"] is False and "live" not in stopped
    assert stopped["pools"]["default"]["size"] == held.size   # saved at shutdown
