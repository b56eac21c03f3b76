"""A running line under attack, for the hostile-input tests: ZeroMQ frames in, a PLC simulator out, the
control socket open. The toy feature model keeps it fast; the tests assert bookkeeping and safety."""
from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from musc_edge.edge.config import parse_config
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import Reason
from musc_edge.edge.runtime.control import request, token_path
from musc_edge.edge.runtime.line import Line
from musc_edge.edge.sources.fields import safe_part_id
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


def jpeg_with_sof(height: int, width: int, stray: bytes = b"\x00", quality: int = 50) -> bytes:
    """A small JPEG whose SOF0 declares ``height`` x ``width``, with ``stray`` bytes just before the SOF marker
    (libjpeg skips them: 'extraneous bytes before marker')."""
    data = bytearray(cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])[1])
    pos = 2
    while data[pos + 1] != 0xC0:
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    data[pos + 5:pos + 9] = struct.pack(">HH", height, width)
    data[pos:pos] = stray
    return bytes(data)


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


# --- a catalogue of hostile ZeroMQ messages (the soak's hostile mix; each one's row is known in advance) -------

HOSTILE_KINDS = ("long_id", "huge_encoder", "bomb", "truncated", "nan_time", "wrap_cloud", "wrap_raw",
                 "deep_json", "huge_json", "jpeg_bomb", "cloud_dtype", "float_shape")
CLOUD_DTYPE_TRICKS = ("object", "float16", "int64", "V12", "<f4")   # "<f4" is float32 spelt otherwise


@dataclass(frozen=True)
class HostileMessage:
    """A hostile ``[header, image, (cloud)]`` message and the NO_VERDICT row the line must give it.

    ``row_id``: the id its ledger row carries; None when the header cannot be read, so the source's own
    counter names the part (its row's detail starts with ``UNREADABLE_DETAIL``)."""

    kind: str
    frames: list
    row_id: str | None
    reason: Reason


UNREADABLE_DETAIL = "unreadable ZeroMQ header"


def hostile_message(kind: str, image: bytes, part_id: str) -> HostileMessage:
    """One message of ``kind`` (one of ``HOSTILE_KINDS``) for part ``part_id``, ``image`` a good PNG."""
    def message(header: dict, *frames, row_id: str | None = part_id, reason: Reason = Reason.DECODE_ERROR):
        return HostileMessage(kind, [json.dumps(header).encode(), *frames], row_id, reason)

    stamped = {"part_id": part_id, "capture_time": time.time()}
    if kind == "long_id":                                              # 70 bytes over the wire's 64
        long_id = part_id + "-" + "L" * 70
        return message({**stamped, "part_id": long_id, "encoding": "png"}, image, row_id=safe_part_id(long_id))
    if kind == "huge_encoder":                                         # beyond SQLite's int64
        return message({**stamped, "encoder": 2 ** 70, "encoding": "png"}, image)
    if kind == "bomb":                                                 # a PNG declaring 30000 x 30000
        return message({**stamped, "encoding": "png"}, png_declaring(30000, 30000))
    if kind == "truncated":
        return message({**stamped, "encoding": "png"}, image[:-40])
    if kind == "nan_time":                                             # JSON with NaN: not JSON, unreadable
        return HostileMessage(kind, [json.dumps({**stamped, "capture_time": float("nan"), "encoding": "png"})
                                     .encode(), image], None, Reason.DECODE_ERROR)
    if kind == "wrap_cloud":                                           # issue 21 row 1: the product wraps int64
        return message({**stamped, "encoding": "png", "cloud_shape": [2 ** 32, 2 ** 32, 3],
                        "cloud_dtype": "float32"}, image, b"", reason=Reason.SCANNER_ERROR)
    if kind == "wrap_raw":                                             # the same for raw pixels
        return message({**stamped, "encoding": "raw", "shape": [2 ** 32, 2 ** 32, 3]}, b"")
    if kind == "deep_json":                                            # issue 21 row 2: RecursionError bait
        return HostileMessage(kind, [b"[" * 100_000 + b"]" * 100_000, image], None, Reason.DECODE_ERROR)
    if kind == "huge_json":                                            # a 200 kB header (a valid object)
        return HostileMessage(kind, [json.dumps({**stamped, "encoding": "png", "pad": "x" * 200_000}).encode(),
                                     image], None, Reason.DECODE_ERROR)
    if kind == "jpeg_bomb":                                            # issue 21 row 3: SOF behind a stray byte
        return message({**stamped, "encoding": "jpeg"}, jpeg_with_sof(32767, 32767))
    if kind == "cloud_dtype":                                          # dtypes a cloud may not have
        dtype = CLOUD_DTYPE_TRICKS[sum(part_id.encode()) % len(CLOUD_DTYPE_TRICKS)]
        return message({**stamped, "encoding": "png", "cloud_shape": [2, 2, 3], "cloud_dtype": dtype},
                       image, bytes(2 * 2 * 3 * 8), reason=Reason.SCANNER_ERROR)
    if kind == "float_shape":                                          # a raw shape of floats, sized to match
        return message({**stamped, "encoding": "raw", "shape": [8.0, 8, 3]}, bytes(8 * 8 * 3))
    raise ValueError(f"unknown hostile kind {kind!r}: one of {HOSTILE_KINDS}")
