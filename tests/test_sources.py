"""Frame sources: decoding, the replayed conveyor, OpenCV capture, ZeroMQ frames, scanner pairing, configs."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.sources import (
    DecodeError,
    OpenCVCameraConfig,
    OpenCVCameraSource,
    ReplayConfig,
    ReplaySource,
    SourceConfigError,
    SourceError,
    SourceNotOpenError,
    UndecodableFrame,
    ZmqFramePusher,
    ZmqSource,
    ZmqSourceConfig,
    decode_part,
    make_source,
)
from musc_edge.edge.sources.sender_frames import parse_frame_ref

pytestmark = pytest.mark.timeout(20)
RNG = np.random.default_rng(7)


def _rgb(h: int = 24, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(rgb: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


def _record(raw: bytes | None = None, image: np.ndarray | None = None) -> PartRecord:
    return PartRecord(part_id="P7", recipe="r", capture_time=0.0, raw=raw, image=image, source_ref="cam/7.png")


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """Six PNGs 000..005 (written out of order) plus a non-image file that must be ignored."""
    folder = tmp_path / "frames"
    folder.mkdir()
    blobs = [_encode(np.full((8, 8, 3), 40 * i, np.uint8), ".png") for i in range(6)]
    for i in (3, 0, 5, 1, 4, 2):
        (folder / f"{i:03d}.png").write_bytes(blobs[i])
    (folder / "readme.txt").write_text("not a frame")
    return folder, blobs


@pytest.fixture
def red_video(tmp_path: Path) -> Path:
    """A five-frame MJPG video of pure red (RGB), 64x48."""
    path = tmp_path / "red.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(5):
        writer.write(np.full((48, 64, 3), (0, 0, 255), np.uint8))  # BGR red
    writer.release()
    return path


def _drain(source) -> list[PartRecord]:
    with source:
        return list(source.parts())


# ---------------------------------------------------------------- decode


def test_decode_png_is_exact_rgb_and_jpeg_tolerates_zero_padding():
    rgb = _rgb()
    assert np.array_equal(decode_part(_record(_encode(rgb, ".png"))).image, rgb)
    flat = np.full((16, 16, 3), (200, 30, 90), np.uint8)
    jpeg = _encode(flat, ".jpg")
    for raw in (jpeg, jpeg + b"\x00" * 16):
        image = decode_part(_record(raw)).image
        assert image.shape == (16, 16, 3)
        assert np.abs(image.astype(int) - flat).max() <= 4


def test_decode_converts_gray_and_bgra_to_rgb():
    gray = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    ok, png = cv2.imencode(".png", gray)
    image = decode_part(_record(png.tobytes())).image
    assert image.shape == (10, 12, 3) and all(np.array_equal(image[..., c], gray) for c in range(3))
    rgb = _rgb(6, 5)
    bgra = np.dstack([rgb[..., ::-1], np.full((6, 5), 255, np.uint8)])
    assert np.array_equal(decode_part(_record(cv2.imencode(".png", bgra)[1].tobytes())).image, rgb)


def _corrupt_png() -> bytes:
    png = bytearray(_encode(_rgb(32, 32), ".png"))
    png[80:200] = bytes(120)  # damages IDAT (CRC mismatch) while IEND stays intact
    return bytes(png)


@pytest.mark.parametrize("raw, message", [
    (b"", "empty frame"),
    (_encode(_rgb(), ".png")[:-20], "truncated PNG"),
    (_encode(_rgb(), ".jpg")[:-30], "truncated JPEG"),
    (_corrupt_png(), "cannot decode"),
    (b"GIF89a not an image at all", "unrecognised format"),
    (cv2.imencode(".png", np.zeros((4, 4, 3), np.uint16))[1].tobytes(), "8-bit"),
    (UndecodableFrame(b"xx", "camera hiccup"), "camera hiccup"),
])
def test_decode_errors_name_the_part_and_the_problem(raw, message):
    record = _record(raw)
    with pytest.raises(DecodeError, match=message) as info:
        decode_part(record)
    assert "P7" in str(info.value) and "cam/7.png" in str(info.value)
    assert record.image is None


@pytest.mark.parametrize("image, message", [
    (np.zeros((4, 4), np.uint8), "RGB uint8"),
    (np.zeros((4, 4, 4), np.uint8), "RGB uint8"),
    (np.zeros((4, 4, 3), np.float32), "RGB uint8"),
    (np.zeros((0, 4, 3), np.uint8), "empty image"),
    (None, "no frame"),
])
def test_decode_checks_images_set_by_the_source(image, message):
    with pytest.raises(DecodeError, match=message):
        decode_part(_record(image=image))


# ---------------------------------------------------------------- replay


def test_replay_order_ids_raw_bytes_and_schedule(image_folder):
    folder, blobs = image_folder
    parts = _drain(ReplaySource(ReplayConfig(path=str(folder), rate=200.0, recipe="bottle")))
    assert [p.part_id for p in parts] == [f"part{i:06d}" for i in range(1, 7)]
    assert [Path(p.source_ref).name for p in parts] == [f"{i:03d}.png" for i in range(6)]
    assert [p.raw for p in parts] == blobs and all(p.image is None and p.recipe == "bottle" for p in parts)
    assert all(p.encoder is None for p in parts)
    t0, utc0 = parts[0].capture_monotonic, parts[0].capture_time
    for k, part in enumerate(parts):
        assert part.capture_monotonic - t0 == pytest.approx(k / 200.0, abs=1e-9)
        assert part.capture_time - utc0 == pytest.approx(k / 200.0, abs=1e-6)


def test_replay_schedule_does_not_wait_for_a_slow_consumer(image_folder):
    folder, _ = image_folder
    parts = []
    with ReplaySource(ReplayConfig(path=str(folder), rate=100.0)) as source:
        for part in source.parts():
            assert time.monotonic() >= part.capture_monotonic  # never handed over before it is captured
            parts.append(part)
            if len(parts) == 2:
                time.sleep(0.05)  # five periods behind
    offsets = [p.capture_monotonic - parts[0].capture_monotonic for p in parts]
    assert offsets == pytest.approx([k / 100.0 for k in range(6)], abs=1e-9)


def test_replay_shuffle_is_seeded_and_reshuffles_each_pass(image_folder):
    folder, _ = image_folder

    def names(**config):
        return [Path(p.source_ref).name for p in _drain(ReplaySource(ReplayConfig(path=str(folder), rate=None,
                                                                                  **config)))]

    first = names(shuffle=True, seed=3)
    assert first == names(shuffle=True, seed=3)
    assert sorted(first) == [f"{i:03d}.png" for i in range(6)] and first != sorted(first)
    assert first != names(shuffle=True, seed=4)
    looped = names(shuffle=True, seed=3, loop=True, limit=12)
    assert looped[:6] == first and sorted(looped[6:]) == sorted(first) and looped[6:] != first


def test_replay_loop_limit_and_simulated_encoder_rollover(image_folder):
    folder, _ = image_folder
    parts = _drain(ReplaySource(ReplayConfig(path=str(folder), rate=None, loop=True, limit=14,
                                             encoder_counts_per_part=100, encoder_start=2 ** 32 - 250)))
    assert len(parts) == 14
    assert [Path(p.source_ref).name for p in parts] == [f"{k % 6:03d}.png" for k in range(14)]
    assert [p.encoder for p in parts[:5]] == [2 ** 32 - 250, 2 ** 32 - 150, 2 ** 32 - 50, 50, 150]


def test_replay_recursive_glob_and_explicit_order(tmp_path, image_folder):
    folder, blobs = image_folder
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "sub" / "deeper" / "x.png").write_bytes(blobs[0])
    assert len(_drain(ReplaySource(ReplayConfig(path=str(folder), rate=None)))) == 6
    assert len(_drain(ReplaySource(ReplayConfig(path=str(folder), rate=None, recursive=True)))) == 7
    assert len(_drain(ReplaySource(ReplayConfig(path=str(folder), pattern="sub/**/*.png", rate=None)))) == 1
    order = [str(folder / f"{i:03d}.png") for i in (4, 1, 5)]
    assert [p.source_ref for p in _drain(ReplaySource(ReplayConfig(paths=order, rate=None)))] == order


def test_replay_close_from_another_thread_ends_parts(image_folder):
    folder, _ = image_folder
    source = ReplaySource(ReplayConfig(path=str(folder), rate=0.2))  # next part due in 5 s
    source.open()
    parts = source.parts()
    assert next(parts).part_id == "part000001"
    threading.Timer(0.1, source.close).start()
    assert list(parts) == []
    assert not source.is_open


def test_replay_file_gone_after_open_becomes_an_undecodable_part(image_folder):
    folder, _ = image_folder
    with ReplaySource(ReplayConfig(path=str(folder), rate=None)) as source:
        (folder / "002.png").unlink()
        parts = list(source.parts())
    assert len(parts) == 6
    with pytest.raises(DecodeError, match="cannot read"):
        decode_part(parts[2])


def test_replay_errors(tmp_path, image_folder):
    with pytest.raises(SourceConfigError, match="nowhere"):
        ReplaySource(ReplayConfig(path=str(tmp_path / "nowhere"))).open()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceConfigError, match=r"'\*\.jpg'"):
        ReplaySource(ReplayConfig(path=str(tmp_path / "empty"), pattern="*.jpg")).open()
    with pytest.raises(SourceConfigError, match="gone.png"):
        ReplaySource(ReplayConfig(paths=[str(tmp_path / "gone.png")])).open()
    with pytest.raises(SourceNotOpenError):
        next(ReplaySource(ReplayConfig(path=str(image_folder[0]))).parts())


def test_replay_video_file(red_video):
    parts = _drain(ReplaySource(ReplayConfig(path=str(red_video), rate=None, loop=True, limit=7)))
    assert len(parts) == 7 and all(p.raw is None and p.image.shape == (48, 64, 3) for p in parts)
    assert parts[4].source_ref.endswith("#frame=4") and parts[5].source_ref.endswith("#frame=0")
    assert parts[0].image[..., 0].min() > 200 and parts[0].image[..., 2].max() < 60  # red in RGB order
    with pytest.raises(SourceConfigError, match="shuffle"):
        ReplaySource(ReplayConfig(path=str(red_video), shuffle=True)).open()


# ---------------------------------------------------------------- OpenCV


def test_opencv_free_run_reads_every_frame_as_rgb(red_video):
    source = OpenCVCameraSource(OpenCVCameraConfig(device=str(red_video), recipe="tire"))
    assert not source.is_open  # lazy: nothing opened by the constructor
    parts = _drain(source)
    assert [p.part_id for p in parts] == [f"part{i:06d}" for i in range(1, 6)]
    assert all(p.raw is None and p.recipe == "tire" and p.image.shape == (48, 64, 3) for p in parts)
    assert parts[0].image[..., 0].min() > 200 and parts[0].image[..., 2].max() < 60


def test_opencv_software_trigger_gives_one_part_per_trigger(red_video):
    source = OpenCVCameraSource(OpenCVCameraConfig(device=str(red_video), trigger="software",
                                                   part_prefix="T", part_digits=3))
    with source:
        before = time.monotonic()
        source.trigger(part_id="A1", encoder=700)
        source.trigger()
        parts = source.parts()
        first, second = next(parts), next(parts)
        threading.Timer(0.1, source.close).start()
        assert list(parts) == []
    assert (first.part_id, first.encoder, second.part_id, second.encoder) == ("A1", 700, "T001", None)
    assert before <= first.capture_monotonic <= second.capture_monotonic
    assert decode_part(first).image.shape == (48, 64, 3)
    with pytest.raises(SourceError, match="software"):
        OpenCVCameraSource(OpenCVCameraConfig(device=str(red_video))).trigger()


def test_opencv_unopenable_device_names_it(tmp_path):
    missing = str(tmp_path / "no_such_camera.avi")
    source = OpenCVCameraSource(OpenCVCameraConfig(device=missing))
    with pytest.raises(SourceError, match="no_such_camera.avi"):
        source.open()


# ---------------------------------------------------------------- ZeroMQ


def _zmq_source(**config) -> ZmqSource:
    return ZmqSource(ZmqSourceConfig(endpoint="tcp://127.0.0.1:*", **config))


def test_zmq_round_trip_with_header_fields_and_cloud():
    rgb = _rgb(6, 8)
    png = _encode(rgb, ".png")
    cloud = RNG.normal(size=(6, 8, 3))  # float64 on the wire
    cloud[0, 0] = np.nan
    with _zmq_source(part_prefix="Z", recipe="fallback") as source, ZmqFramePusher(source.endpoint) as pusher:
        sent_at = time.time() - 0.2
        pusher.send(png, part_id="A17", capture_time=sent_at, encoder=1234, recipe="bottle", test_part=True,
                    cloud=cloud)
        pusher.send(rgb)  # raw pixels, no part id
        parts = source.parts()
        first, second = next(parts), next(parts)
    assert (first.part_id, first.encoder, first.recipe, first.test_part) == ("A17", 1234, "bottle", True)
    assert first.capture_time == sent_at and first.raw == png and first.image is None
    assert time.monotonic() - first.capture_monotonic >= 0.2  # transport age counts against the deadline
    assert first.cloud.dtype == np.float32 and np.allclose(first.cloud, cloud, equal_nan=True)
    assert np.array_equal(decode_part(first).image, rgb) and first.verdict is None
    assert (second.part_id, second.recipe, second.raw) == ("Z000001", "fallback", None)
    assert np.array_equal(decode_part(second).image, rgb)
    assert (source.received, source.malformed, source.unreadable_headers) == (2, 0, 0)


def test_zmq_malformed_messages_become_parts_that_fail_with_a_reason():
    png, jpeg = _encode(_rgb(), ".png"), _encode(_rgb(), ".jpg")

    def header(**fields):
        return json.dumps(fields).encode()

    messages = [
        [header(part_id="no-image", encoding="png")],
        [header(part_id="mislabelled", encoding="png"), jpeg],
        [header(part_id="short-raw", encoding="raw", shape=[4, 4, 3]), bytes(10)],
        [b"\xff not json"],
        [header(part_id="bad-encoder", encoding="png", encoder="12"), png],
        [header(part_id="bad-cloud", encoding="png", cloud_shape=[2, 2, 3], cloud_dtype="float32"), png, bytes(8)],
        [header(part_id="good", encoding="png"), png],
    ]
    with _zmq_source() as source, ZmqFramePusher(source.endpoint) as pusher:
        for message in messages:
            pusher.socket.send_multipart(message)
        parts = source.parts()
        received = [next(parts) for _ in range(len(messages))]
    by_id = {p.part_id: p for p in received}
    unreadable = received[3]   # the header is not JSON: a part under the counter's id, decided at once
    assert (unreadable.verdict, unreadable.reason) == (Verdict.NO_VERDICT, Reason.DECODE_ERROR)
    assert "unreadable ZeroMQ header" in unreadable.detail and unreadable.part_id == "part000001"
    assert list(by_id) == ["no-image", "mislabelled", "short-raw", unreadable.part_id, "bad-encoder", "bad-cloud",
                           "good"]
    for part_id, reason in [("no-image", "1 part"), ("mislabelled", "encoding 'png'"),
                            ("short-raw", "10 bytes"), ("bad-encoder", "'encoder'")]:
        with pytest.raises(DecodeError, match=reason):
            decode_part(by_id[part_id])
    bad_cloud = by_id["bad-cloud"]
    assert (bad_cloud.verdict, bad_cloud.reason, bad_cloud.cloud) == (Verdict.NO_VERDICT, Reason.SCANNER_ERROR, None)
    assert "8 bytes" in bad_cloud.detail and decode_part(bad_cloud).image is not None
    assert decode_part(by_id["good"]).image.shape == (24, 32, 3)
    assert (source.received, source.malformed, source.unreadable_headers) == (7, 6, 1)


def test_zmq_message_over_the_size_limit_still_becomes_a_part_and_so_do_those_lost_with_it(caplog):
    """ZeroMQ drops a message over max_message_bytes and the sender's connection with what it queued behind
    it; the pusher numbers its frames, so each lost one becomes a NO_VERDICT part when the next one arrives."""
    png = _encode(_rgb(), ".png")
    huge = np.zeros((64, 64, 3), np.uint8)   # 12 KiB of raw pixels
    received = threading.Event()
    with _zmq_source(max_message_bytes=4096) as source, ZmqFramePusher(source.endpoint) as pusher:
        parts = source.parts()
        pusher.send(png, part_id="before")
        assert next(parts).part_id == "before" and source.disconnects == 0
        pusher.send(huge, part_id="huge")
        pusher.send(png, part_id="right-behind")   # into the connection ZeroMQ is dropping

        def keep_sending():
            for k in range(100):
                if received.wait(0.1):
                    return
                pusher.send(png, part_id=f"after{k}")
        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            got = []
            while not got or got[-1].verdict is not None:   # up to the first part that arrived itself
                got.append(next(parts))
        finally:
            received.set()
            sender.join()
    lost, arrived = got[:-1], got[-1]
    frame_of = {"before": 1, "huge": 2, "right-behind": 3, **{f"after{k}": 4 + k for k in range(100)}}
    numbers = [parse_frame_ref(p.source_ref)[1] for p in lost]
    assert numbers == list(range(2, frame_of[arrived.part_id]))   # every frame between is a part, "huge" first
    for part in lost:
        assert (part.verdict, part.reason) == (Verdict.NO_VERDICT, Reason.DECODE_ERROR)
        assert "never arrived" in part.detail and "max_message_bytes=4096" in part.detail
        assert part.source_ref.startswith(f"zmq://{pusher.sender}/")
    assert source.frames.missing == len(lost) and source.received == 2 and source.disconnects == 1
    assert "over max_message_bytes=4096" in caplog.text


def test_zmq_frame_ids_skipped_while_the_connection_held_are_no_lost_frames_and_bad_numbers_fail_their_part():
    """ZeroMQ loses frames only with a connection: a peer that skips ids over a sound one gets an alarm, not a part
    per id (it cannot multiply its parts that way)."""
    png = _encode(_rgb(), ".png")
    alarms = []
    with _zmq_source() as source, ZmqFramePusher(source.endpoint) as pusher:
        source.on_alarm = alarms.append
        parts = source.parts()
        for frame_id, extra in [(1, {}), (3, {}), (100, {}), (7, {}), (8, {"sender": "x" * 49})]:
            pusher.send(png, part_id=f"F{frame_id}", frame_id=frame_id, **extra)
        got = [next(parts) for _ in range(5)]
    assert [p.part_id for p in got] == ["F1", "F3", "F100", "F7", "F8"] and source.frames.missing == 0
    assert alarms == [f"ZeroMQ sender {pusher.sender!r} skipped frame ids {a}..{b} with no broken connection "
                      "between: not taken as lost frames (a sender that skips ids, or not a real sender)"
                      for a, b in [(2, 2), (4, 99)]]
    assert source.frames.restarts == 1                     # 7 after 100: the sender counts again, nothing lost
    assert got[1].source_ref == f"zmq://{pusher.sender}/3" and got[4].source_ref == "zmq:F8"
    with pytest.raises(DecodeError, match="header .sender. must be printable text of at most 48"):
        decode_part(got[4])


def test_zmq_frames_lost_beyond_max_gap_rows_give_one_alarm_instead_of_parts():
    png = _encode(_rgb(), ".png")
    alarms = []
    received = threading.Event()
    with _zmq_source(max_message_bytes=4096, max_gap_rows=3) as source, ZmqFramePusher(source.endpoint) as pusher:
        source.on_alarm = alarms.append
        parts = source.parts()
        pusher.send(png, part_id="F1", frame_id=1)
        assert next(parts).part_id == "F1"
        pusher.send(np.zeros((64, 64, 3), np.uint8), part_id="huge", frame_id=2)   # over the limit: the link breaks

        def keep_sending():
            for k in range(100):
                if received.wait(0.1):
                    return
                pusher.send(png, part_id=f"F{100 + k}", frame_id=100 + k)
        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            arrived = next(parts)
        finally:
            received.set()
            sender.join()
    first = int(arrived.part_id[1:])
    assert arrived.verdict is None and source.disconnects == 1 and source.frames.missing == first - 2
    assert alarms == [f"ZeroMQ sender {pusher.sender!r}: {first - 2} frames never arrived, ids 2..{first - 1} (over "
                      "max_gap_rows=3 lost within 60 s; no part rows for them)"]


def test_zmq_a_peer_that_reconnects_before_each_skip_gets_max_gap_rows_parts_a_minute_then_alarms():
    png = _encode(_rgb(), ".png")
    alarms, got = [], []
    with _zmq_source(max_gap_rows=3) as source:
        source.on_alarm = alarms.append
        reader = threading.Thread(target=lambda: got.extend(source.parts()), daemon=True)
        reader.start()
        for cycle in range(6):          # frames 1, 3, 5, ... each on a new connection: one id "lost" each time
            with ZmqFramePusher(source.endpoint, sender="peer") as pusher:
                pusher.send(png, part_id=f"P{cycle}", frame_id=1 + 2 * cycle)
                _wait_until(lambda: sum(p.verdict is None for p in got) == cycle + 1)
            _wait_until(lambda: source.disconnects == cycle + 1)   # the break is seen before the next frame
    lost = [p for p in got if p.verdict is not None]
    assert [parse_frame_ref(p.source_ref) for p in lost] == [("peer", 2), ("peer", 4), ("peer", 6)]
    assert alarms == [f"ZeroMQ sender 'peer': 1 frames never arrived, ids {k}..{k} (over max_gap_rows=3 lost within "
                      "60 s; no part rows for them)" for k in (8, 10)]


def _wait_until(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_zmq_endpoint_in_use_is_a_clear_error():
    with _zmq_source() as first:
        with pytest.raises(SourceError, match="endpoint='tcp://127.0.0.1:"):
            ZmqSource(ZmqSourceConfig(endpoint=first.endpoint)).open()


# ---------------------------------------------------------------- real data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BOTTLE_TEST = DATA / "mvtec_ad" / "bottle" / "test"


@pytest.mark.data
@pytest.mark.skipif(not BOTTLE_TEST.is_dir(), reason="needs ../shared/data/mvtec_ad/bottle")
def test_replayed_mvtec_pngs_decode_to_rgb():
    source = make_source({"type": "replay", "path": str(BOTTLE_TEST), "pattern": "**/*.png", "rate": None,
                          "shuffle": True, "seed": 0, "limit": 3, "recipe": "bottle"})
    parts = [decode_part(p) for p in _drain(source)]
    assert len(parts) == 3 and all(p.image.shape == (900, 900, 3) and p.image.dtype == np.uint8 for p in parts)
    assert len({p.source_ref for p in parts}) == 3 and all(p.image.std() > 1 for p in parts)


# ---------------------------------------------------------------- make_source


def test_make_source_builds_each_type(tmp_path, image_folder):
    assert isinstance(make_source({"type": "replay", "path": str(image_folder[0]), "rate": 5}), ReplaySource)
    camera = make_source({"type": "opencv", "device": "0", "width": 640, "height": 480})
    assert isinstance(camera, OpenCVCameraSource) and camera.config.device == 0
    assert isinstance(make_source({"type": "zmq", "endpoint": "tcp://127.0.0.1:5555"}), ZmqSource)


@pytest.mark.parametrize("config, message", [
    ({}, "missing key 'type'"),
    ({"type": "kinect"}, "'kinect'"),
    ({"type": "zmq"}, "missing key 'endpoint'"),
    ({"type": "zmq", "endpoint": "localhost:5555"}, "'endpoint'"),
    ({"type": "replay"}, "'path' and 'paths'"),
    ({"type": "replay", "path": "x", "fps": 3}, "unknown source config key 'fps'"),
    ({"type": "replay", "path": "x", "rate": -1}, "'rate' must be greater than 0"),
    ({"type": "replay", "path": "x", "limit": 0}, "'limit'"),
    ({"type": "opencv", "device": 0, "trigger": "hardware"}, "'trigger'"),
    ({"type": "opencv", "device": 0, "recipe": ""}, "'recipe'"),
])
def test_make_source_errors_name_the_key(config, message):
    with pytest.raises(SourceConfigError, match=message):
        make_source(config)
