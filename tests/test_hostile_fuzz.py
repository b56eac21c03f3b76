"""Fuzzing a running line (issue #8): generated ZeroMQ messages and control requests, hostile by design.

Whatever arrives, the line keeps running, and every part it creates has exactly one ledger row and one
acknowledged message at the PLC. Bounded: a few hundred examples, about half a minute.
"""
from __future__ import annotations

import json
import math
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musc_edge.edge.plc_sim import PlcSimulator

from .hostile import LiveLine, assert_one_row_and_ack_each, line_config, png, png_declaring, wait_for

GOOD = png(0)
HOSTILE_TEXT = st.one_of(st.text(max_size=120), st.just("\ud800"), st.just("A" * 65), st.just(""),
                         st.just("../../etc/passwd"), st.just("x\x00y"))
HOSTILE_NUMBER = st.one_of(st.integers(), st.integers(min_value=2 ** 63 - 2, max_value=2 ** 80),
                           st.floats(allow_nan=True, allow_infinity=True), st.just(-1), st.just(1e300))
ANY_VALUE = st.one_of(st.none(), st.booleans(), HOSTILE_NUMBER, HOSTILE_TEXT,
                      st.lists(st.integers(-5, 70000), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                    max_size=2))
SHAPE = st.one_of(ANY_VALUE, st.lists(st.one_of(st.integers(-1, 70000), st.integers(2 ** 31, 2 ** 66)), max_size=4),
                  st.just([2 ** 32, 2 ** 32, 3]), st.just([2 ** 21, 2 ** 21, 3]))   # products that wrap int64
HEADER = st.fixed_dictionaries({}, optional={
    "part_id": st.one_of(HOSTILE_TEXT, ANY_VALUE), "encoder": ANY_VALUE, "capture_time": ANY_VALUE,
    "recipe": st.one_of(st.just("default"), ANY_VALUE), "test_part": ANY_VALUE,
    "encoding": st.one_of(st.sampled_from(["png", "jpeg", "bmp", "raw"]), ANY_VALUE),
    "shape": SHAPE, "cloud_shape": SHAPE,
    "cloud_dtype": st.one_of(st.sampled_from(["float32", "float64", "float16", "object"]), ANY_VALUE)})
PAYLOAD = st.one_of(st.just(GOOD), st.just(GOOD[:-20]), st.just(png_declaring(30000, 30000)),
                    st.binary(max_size=300), st.just(b""))
MESSAGE = st.one_of(
    st.tuples(HEADER.map(lambda h: json.dumps(h).encode()), PAYLOAD).map(list),
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),                     # any frames at all
    st.tuples(HEADER.map(lambda h: json.dumps(h).encode()), PAYLOAD, st.binary(max_size=64)).map(list),
    st.integers(1, 200_000).map(lambda n: [b"[" * n + b"]" * n, GOOD]),           # nesting (RecursionError)
)
COMMANDS = ["status", "pool_inspect", "pool_scores", "apply", "pool_purge", "pool_freeze", "pool_unfreeze",
            "pool_reseed", "test_fire", "rm -rf", ""]
REQUEST = st.fixed_dictionaries({"cmd": st.one_of(st.sampled_from(COMMANDS), ANY_VALUE)}, optional={
    "part_id": st.one_of(HOSTILE_TEXT, ANY_VALUE), "recipe": ANY_VALUE, "part_ids": ANY_VALUE, "lowest": ANY_VALUE,
    "all": ANY_VALUE, "folder": ANY_VALUE, "include_golden": ANY_VALUE, "token": ANY_VALUE,
    "calibration": st.one_of(ANY_VALUE, st.fixed_dictionaries({"version": HOSTILE_NUMBER, "recipes": st.just(
        {"default": {"threshold": math.nan}})}))})
REQUEST = st.one_of(REQUEST, st.builds(lambda k: {"cmd": "test_fire", "part_id": f"TEST-{k}", "recipe": "default"},
                                       st.integers(0, 999)))


def _raw_request(path, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1 << 16)


@pytest.mark.slow
def test_generated_messages_and_control_requests_never_stop_the_line(toy_model, tmp_path):
    fired: list[str] = []
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        live = LiveLine(line_config(toy_model, tmp_path / "line", plc.address))
        token = (tmp_path / "line" / "calibration" / "technician.token").read_text().strip()

        @settings(max_examples=250, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(MESSAGE)
        def frames(message):
            live.send_raw(message)

        @settings(max_examples=80, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(REQUEST, st.booleans(), st.booleans())
        def requests(payload, with_token, as_bytes):
            if with_token:
                payload = {**payload, "token": token}
            if as_bytes:   # not even JSON, or cut short
                _raw_request(live.storage / "control.sock", json.dumps(payload).encode()[:-3] + b"\xff\n")
                return
            reply = live.control(payload, token=False)
            assert isinstance(reply, dict) and "ok" in reply
            if reply["ok"] and payload.get("cmd") == "test_fire":
                fired.append(reply["part_id"])

        frames()
        requests()
        assert live.thread.is_alive() and live.error is None
        for k in range(5):                       # and the line still inspects ordinary parts
            live.send(png(100 + k), part_id=f"after-fuzz-{k}")
        source = live.line.source
        wait_for(lambda: live.parts >= source.received + len(fired) or live.error is not None, 120,
                 "every part decided")
        rows = live.stop()
        print(f"fuzz: {source.received} parts from the source ({source.malformed} malformed, of which "
              f"{source.unreadable_headers} with unreadable headers), {len(fired)} test fires, {len(rows)} rows")
        assert len(rows) == source.received + len(fired)
        assert [r.part_id for r in rows[-5:]] == [f"after-fuzz-{k}" for k in range(5)]
        assert_one_row_and_ack_each(rows, plc)
