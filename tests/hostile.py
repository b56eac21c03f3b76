"""A running line under attack, for the hostile-input tests: ZeroMQ frames in, a PLC simulator out, the
control socket open. The toy feature model keeps it fast; the tests assert bookkeeping and safety."""
from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

from musc_edge.edge.config import parse_config
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.runtime.control import request, token_path
from musc_edge.edge.runtime.line import Line
from musc_edge.edge.sources.zmq_source import ZmqFramePusher


def png(seed: int, size: int = 64) -> bytes:
    """A small random RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return cv2.imencode(".png", pixels)[1].tobytes()


def png_declaring(width: int, height: int) -> bytes:
    """A complete, tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(2 << 20), 9))
            + chunk(b"IEND", b""))


def line_config(model: Path, storage: Path, plc_address: str, **line) -> dict:
    return {
        "line": {"deadline_ms": 5000, "queue_size": 64, **line},
        "model": {"path": str(model), "size": 112, "blocks": [6, 9]},
        "recipes": {"default": {"threshold": 1.0, "pool": {"capacity": 10, "min_size": 4,
                                                           "persist_every_s": 0.5}}},
        "source": {"type": "zmq", "endpoint": "tcp://127.0.0.1:*", "recipe": "default"},
        "link": {"type": "zmq", "endpoint": plc_address, "heartbeat_interval_s": 0.2, "silence_alarm_s": 2.0},
        "storage": {"dir": str(storage), "archive": {"enabled": False}},
    }


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class LiveLine:
    """``Line.run()`` in a thread, fed by a ZeroMQ pusher, signalling a PLC simulator."""

    def __init__(self, raw: dict) -> None:
        self.line = Line(parse_config(raw))
        self.storage = Path(raw["storage"]["dir"])
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.line.source.endpoint is not None and self.line.control is not None, 30,
                 "the line to open its source and control socket")
        self.pusher = ZmqFramePusher(self.line.source.endpoint)

    def _run(self) -> None:
        try:
            self.line.run()
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc

    @property
    def parts(self) -> int:
        return self.line.stats.parts

    def send(self, image: bytes, **header) -> None:
        self.pusher.send(image, **header)

    def send_raw(self, frames: list[bytes]) -> None:
        self.pusher.socket.send_multipart(frames)

    def wait_parts(self, n: int, timeout: float = 60) -> None:
        wait_for(lambda: self.parts >= n or self.error is not None, timeout, f"{n} parts")
        assert self.error is None, self.error

    def control(self, payload: dict, *, token: bool = True) -> dict:
        if token:
            payload = {**payload, "token": token_path(self.storage).read_text().strip()}
        return request(self.storage / "control.sock", payload)

    def stop(self) -> list:
        self.pusher.close()
        self.line.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the line did not stop"
        if self.error is not None:
            raise self.error
        return self.line.ledger_rows()


def assert_one_row_and_ack_each(rows, plc: PlcSimulator) -> None:
    """Every row acknowledged, and the PLC logged each sent seq exactly once."""
    wait_for(lambda: len(plc.received()) >= len([r for r in rows if not r.dry_run]), 10, "every verdict at the PLC")
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert all(r.acked for r in rows), [(r.seq, r.part_id) for r in rows if not r.acked]
    assert sorted(v.seq for v in plc.received()) == [r.seq for r in rows]
    assert plc.counters().out_of_order == 0
