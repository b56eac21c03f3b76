"""Sizes and numbers are checked where they enter, in one place each (issue 21, items 2, 3 and 7):
declared shapes and JSON (edge_app/limits.py), image headers (edge_app/mediaio.py), cloud headers
(pointcloud/io.py), every numeric config field (edge_app/strict_model.py), the archive's disk floor and
names, damaged pool files, the view's sequence numbers. Properties, walked or generated, not examples."""
from __future__ import annotations

import copy
import io
import json
import math
import struct
import time
import tracemalloc
import typing
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from musc_edge.edge.archive import RejectArchive, parse_archive_name
from musc_edge.edge.config import ConfigError, LineConfig, parse_config
from musc_edge.edge.limits import MAX_SIDE, LimitError, checked_shape, json_depth, loads_bounded
from musc_edge.edge.links import AnyLinkConfig
from musc_edge.edge.mediaio import MediaError, decode_image, declared_size, read_image
from musc_edge.edge.pointcloud.io import MAX_CLOUD_POINTS, CloudError, read_cloud
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime.pool_store import load_pool, previous_path, save_pool
from musc_edge.edge.sources.base import SOURCE_TYPES, PartIds
from musc_edge.edge.sources.configs import AnySourceConfig
from musc_edge.edge.sources.zmq_source import HeaderError, parse_message
from musc_edge.edge.strict_model import StrictModel, numeric_annotation

from .hostile import jpeg_with_sof

FUZZ = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


# --- shapes and JSON ---------------------------------------------------------------------------------------

@FUZZ
@given(st.lists(st.one_of(st.integers(-5, 2 ** 70), st.booleans(), st.floats(), st.text(max_size=2)), max_size=5))
def test_a_checked_shape_is_exact_and_within_every_limit(value):
    try:
        shape = checked_shape(value, where="s", max_elements=1 << 30)
    except LimitError as exc:
        assert str(exc).startswith("s: ") and "\n" not in str(exc)
        return
    assert all(type(v) is int and 1 <= v <= MAX_SIDE for v in shape)
    assert math.prod(shape) <= 1 << 30   # exact: Python ints, never int64 wrap-around


def test_the_row_1_shape_whose_int64_product_wraps_is_refused():
    wrapped = int(np.prod(np.array([2 ** 32, 2 ** 32, 3], dtype=np.int64)))
    assert wrapped == 0   # what np.prod made of it: an empty cloud frame "matched"
    with pytest.raises(LimitError, match="outside 1..65535"):
        checked_shape([2 ** 32, 2 ** 32, 3], where="cloud_shape", ndim=3, fixed={2: 3})


JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(),
                                    st.text(alphabet="[]{}\"\\ab", max_size=6)),
                          lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(alphabet="[]{a\"", max_size=3), inner,
                                                                  max_size=3)), max_leaves=40)


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@FUZZ
@given(JSON_VALUE)
def test_json_depth_is_counted_without_recursion_and_ignores_brackets_in_strings(value):
    text = json.dumps(value)
    assert json_depth(text) == _depth(value)
    if _depth(value) <= 4:
        assert loads_bounded(text, where="h", max_depth=4) == value
    else:
        with pytest.raises(LimitError, match="nested"):
            loads_bounded(text, where="h", max_depth=4)


@pytest.mark.parametrize("text, message", [(b"[" * 100_000 + b"]" * 100_000, "over the limit"),
                                           (b"[" * 20 + b"]" * 20, "nested 20 levels"),
                                           (b'{"a": NaN}', "NaN is not a JSON number"),
                                           (b'{"a": -Infinity}', "Infinity is not a JSON number"),
                                           (b"\xff{}", "not UTF-8"), (b"{", "not JSON")])
def test_row_2_hostile_json_is_one_limit_error(text, message):
    with pytest.raises(LimitError, match=message):
        loads_bounded(text, where="header", max_depth=16)


# --- ZeroMQ header fields (parsed as the source parses them) ------------------------------------------------

SIDE = st.one_of(st.integers(-3, 70_000), st.integers(2 ** 31, 2 ** 66), st.booleans(), st.floats(), st.none(),
                 st.text(max_size=3))
SHAPE = st.one_of(st.lists(SIDE, max_size=5), st.just([2 ** 32, 2 ** 32, 3]), st.just([4, 5, 3]),
                  st.just([2 ** 21, 2 ** 21, 3]), SIDE)
DTYPE = st.one_of(st.sampled_from(["float32", "float64", "float16", "uint8", "<f4", "object"]), SIDE,
                  st.lists(st.text(max_size=3), max_size=2))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@FUZZ
@given(st.fixed_dictionaries({"encoding": st.sampled_from(["png", "raw", "jpeg"])},
                             optional={"shape": SHAPE, "cloud_shape": SHAPE, "cloud_dtype": DTYPE,
                                       "part_id": st.text(max_size=8)}),
       st.integers(0, 400), st.binary(max_size=256), st.booleans())
def test_any_header_shape_or_dtype_becomes_a_part_or_an_unreadable_header_never_an_allocation(
        header, nesting, cloud, with_cloud):
    text = json.dumps(header)
    if nesting:
        text = text[:-1] + f', "deep": {_nested(nesting)}}}'
    frames = [text.encode(), b"\x89PNG\r\n\x1a\n"] + ([cloud] if with_cloud else [])
    tracemalloc.start()
    try:
        part = parse_message(frames, part_ids=PartIds("Z"), recipe="default", received_monotonic=time.monotonic(),
                             received_utc=time.time())
    except HeaderError:
        assert nesting > 32   # the only header that cannot be read here: nested past the limit
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert nesting <= 32 and isinstance(part, PartRecord)
    assert peak < 1 << 20, f"{peak} bytes traced for a {len(cloud)}-byte cloud"
    if part.cloud is not None:
        assert part.cloud.dtype == np.float32 and part.cloud.nbytes <= 2 * len(cloud)


# --- image headers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stray", [b"\x00", b"\x12\x34\x56", b"\xff\xff\xff", b"\xff\x00"])
def test_row_3_a_sof_behind_stray_or_fill_bytes_is_found_and_refused_before_decoding(stray, tmp_path):
    bomb = jpeg_with_sof(32767, 32767, stray)
    assert declared_size(bomb) == (32767, 32767)
    with pytest.raises(MediaError, match="32767 x 32767 = 1073.7 MP, over the pixel budget"):
        decode_image(bomb, "frame")
    (tmp_path / "bomb.png").write_bytes(bomb)      # a seed folder or a dataset reads files the same way
    with pytest.raises(MediaError, match="over the pixel budget"):
        read_image(tmp_path / "bomb.png")


def _markers(data: bytes) -> list[int]:
    """Offsets of the marker segments after SOI, up to SOS (the header)."""
    offsets, pos = [], 2
    while data[pos + 1] != 0xDA:
        offsets.append(pos)
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return offsets + [pos]


@FUZZ
@given(st.integers(1, 96), st.integers(1, 96), st.data())
def test_whenever_the_decoder_reads_a_jpeg_its_size_is_the_one_the_header_walk_found(height, width, data):
    """Stray bytes, fill bytes and stuffed zeros in front of any header marker: libjpeg skips them, and so must
    the walk, or a bomb hides behind them. Generated: whatever opencv decodes has the declared size."""
    image = np.random.default_rng(height * 97 + width).integers(0, 255, (height, width, 3), dtype=np.uint8)
    encoded = bytearray(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80,
                                                      cv2.IMWRITE_JPEG_PROGRESSIVE, data.draw(st.integers(0, 1))])[1])
    offsets = _markers(bytes(encoded))
    for pos in sorted(data.draw(st.lists(st.sampled_from(offsets), max_size=3)), reverse=True):
        junk = data.draw(st.one_of(st.binary(min_size=1, max_size=4).filter(lambda b: b"\xff" not in b),
                                   st.just(b"\xff" * 3), st.just(b"\xff\x00"), st.just(b"\x00\xff\xff")))
        encoded[pos:pos] = junk
    encoded = bytes(encoded)
    decoded = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    if decoded is not None:
        assert declared_size(encoded) == decoded.shape[:2]
        assert decode_image(encoded, "f").shape == decoded.shape


def _declaring(suffix: str, height: int, width: int) -> bytes:
    """A small PNG or BMP whose header is rewritten to declare ``height`` x ``width``."""
    data = bytearray(cv2.imencode(suffix, np.zeros((4, 6, 3), np.uint8))[1])
    if suffix == ".png":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", __import__("zlib").crc32(bytes(data[12:29])))
    else:
        data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


@FUZZ
@given(st.sampled_from([".png", ".bmp"]), st.integers(1, 2 ** 31 - 1), st.integers(1, 2 ** 31 - 1))
def test_a_png_or_bmp_header_declaring_any_size_is_decoded_only_within_the_budget(suffix, height, width):
    data = _declaring(suffix, height, width)
    assert declared_size(data) == (height, width)
    try:
        image = decode_image(data, "f", max_pixels=4096)
    except MediaError as exc:
        assert height * width > 4096 or "corrupt" in str(exc) or "truncated" in str(exc), exc
        return
    assert image.shape[:2] == (height, width) and height * width <= 4096


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".jpg"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (513, 2)])
def test_every_format_declares_the_size_it_decodes_to(suffix, shape):
    encoded = cv2.imencode(suffix, np.zeros((*shape, 3), np.uint8))[1].tobytes()
    assert declared_size(encoded) == shape == decode_image(encoded, "f").shape[:2]


def test_a_header_without_a_checkable_size_is_refused_before_decoding():
    jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    sos = jpeg.index(b"\xff\xda")
    no_sof = bytearray(jpeg)
    start = no_sof.index(b"\xff\xc0")
    no_sof[start + 1] = 0xFE   # SOF0 becomes a comment: the decoder cannot know the size, nor can we
    with pytest.raises(MediaError, match="declares no image size"):
        decode_image(bytes(no_sof), "f")
    assert sos > 0


# --- clouds from their headers --------------------------------------------------------------------------------

def test_row_18_a_small_tiff_cloud_declaring_a_huge_one_is_refused_on_its_header(tmp_path):
    """The issue's file declared 12000 x 12000 (1.6 GiB); 4200 x 4200 (0.2 GiB) is over the limit too and
    cheaper to write."""
    tifffile = pytest.importorskip("tifffile")
    side, tile = 4200, 1024
    assert side * side > MAX_CLOUD_POINTS
    path = tmp_path / "bomb.tiff"
    tifffile.imwrite(path, (np.zeros((tile, tile, 3), np.float32) for _ in range(math.ceil(side / tile) ** 2)),
                     shape=(side, side, 3), dtype="float32", tile=(tile, tile), compression="zlib",
                     photometric="rgb")
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CloudError, match="52,920,000 elements.*before reading"):
            read_cloud(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20   # the 0.2 GiB array was never allocated


def test_npy_ply_and_pcd_clouds_declaring_too_many_points_are_refused_before_reading(tmp_path):
    npy = tmp_path / "big.npy"
    with open(npy, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (50_000, 50_000, 3)})
    with pytest.raises(CloudError, match="big.npy"):
        read_cloud(npy)
    too_many = MAX_CLOUD_POINTS + 1
    ply = tmp_path / "big.ply"
    ply.write_bytes(f"ply\nformat binary_little_endian 1.0\nelement vertex {too_many}\nproperty float x\n"
                    f"property float y\nproperty float z\nend_header\n".encode())
    with pytest.raises(CloudError, match="big.ply.*(outside|over the limit)"):
        read_cloud(ply)
    pcd = tmp_path / "big.pcd"
    pcd.write_bytes(b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 100000\nHEIGHT 100000\n"
                    b"POINTS 10000000000\nDATA binary\n")
    with pytest.raises(CloudError, match="big.pcd.*over the limit"):
        read_cloud(pcd)


# --- config: every numeric field ---------------------------------------------------------------------------

LINK_REQUIRED = {"serial": {"url": "loop://"}, "zmq": {}, "modbus-tcp": {}, "modbus-rtu": {"port": "/dev/null"},
                 "opcua": {"users": [{"username": "plc", "password": "p" * 16}]}}


SOURCE_REQUIRED = {"replay": {"path": "frames"}, "opencv": {"device": 0},
                   "zmq": {"endpoint": "tcp://127.0.0.1:5999"}, "genicam": {"camera": "cam"}}


def base_config(kind: str = "zmq") -> dict:
    """A valid config: a zmq source (2d+3d recipe) and the link of type ``kind``, or for ``source:<type>`` a
    source of that type (2d recipe, which every source type can feed) and a zmq link."""
    if kind.startswith("source:"):
        source_type = kind.removeprefix("source:")
        return {"source": {"type": source_type, **SOURCE_REQUIRED[source_type]}, "link": {"type": "zmq"},
                "recipes": {"default": {"modality": "2d"}}}
    return {"source": {"type": "zmq", "endpoint": "tcp://127.0.0.1:5999"},
            "link": {"type": kind, **LINK_REQUIRED[kind]},
            "recipes": {"default": {"modality": "2d+3d", "scan": {}}}}


def _models(annotation) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (Optional, dict values, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def numeric_fields(model: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, object]]:
    """(path, FieldInfo) of every int/float field reachable from ``model`` (dicts: the 'default' key)."""
    found = []
    for name, info in model.model_fields.items():
        path = prefix + (name,)
        if numeric_annotation(info.annotation):
            found.append((path, info))
        for inner in _models(info.annotation):
            if typing.get_origin(info.annotation) is dict:
                found += numeric_fields(inner, path + ("default",))
            elif inner.__name__ != "OpcUaUser" and name not in ("link", "source"):
                found += numeric_fields(inner, path)
    return found


def all_numeric_fields() -> list[tuple[str, tuple, object]]:
    fields = [("zmq", path, info) for path, info in numeric_fields(LineConfig)]
    for link in typing.get_args(AnyLinkConfig):
        kind = link.model_fields["type"].default
        fields += [(kind, ("link",) + path, info) for path, info in numeric_fields(link)]
    for source in typing.get_args(AnySourceConfig):
        kind = source.model_fields["type"].default
        fields += [(f"source:{kind}", ("source",) + path, info) for path, info in numeric_fields(source)]
    return fields


FIELDS = all_numeric_fields()


def bounds(info) -> tuple[float, bool, float, bool]:
    """(low, low inclusive, high, high inclusive) the field states."""
    low = high = None
    for rule in info.metadata:
        for attr, inclusive, is_low in (("ge", True, True), ("gt", False, True), ("le", True, False),
                                        ("lt", False, False)):
            value = getattr(rule, attr, None)
            if value is not None:
                if is_low:
                    low = (value, inclusive)
                else:
                    high = (value, inclusive)
    assert low is not None and high is not None, "every numeric field states both ends of its range"
    return low[0], low[1], high[0], high[1]


def test_every_numeric_config_field_follows_the_one_policy_and_states_both_ends_of_its_range():
    assert len(FIELDS) > 60
    for kind, path, info in FIELDS:
        low, _, high, _ = bounds(info)
        assert math.isfinite(low) and math.isfinite(high), path
    models, todo = set(), [LineConfig, *typing.get_args(AnyLinkConfig)]
    while todo:
        model = todo.pop()
        if model not in models:
            models.add(model)
            todo += [m for info in model.model_fields.values() for m in _models(info.annotation)]
    models.discard(typing.get_args(AnyLinkConfig)[-1].model_fields["users"].annotation.__args__[0])  # OpcUaUser
    assert len(models) > 15
    for model in models:
        assert issubclass(model, StrictModel) and model.model_config.get("allow_inf_nan") is False, model


def _set(raw: dict, path: tuple, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return raw


def _valid(info, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if typing.get_args(info.annotation) and int in typing.get_args(info.annotation) or info.annotation is int:
        if value != int(value):
            return False
    low, low_in, high, high_in = bounds(info)
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


HOSTILE = [math.nan, math.inf, -math.inf, 0, -1, 0.5, 1e300, 10 ** 30, True, "x", [1], {"a": 1}]


def _check(kind: str, path: tuple, info, value) -> None:
    raw = _set(base_config(kind), path, value)
    try:
        config = parse_config(raw)
    except ConfigError as exc:
        text = str(exc)
        assert "\n" not in text, f"{path}={value!r}: not one line: {text}"
        assert path[-1] in text, f"{path}={value!r}: the error does not name the key: {text}"
        assert not _valid(info, value) or "must" in text or "exceed" in text or "below" in text, \
            f"{path}={value!r} is within the stated range but refused: {text}"
        return
    assert _valid(info, value), f"{path} = {value!r} accepted"
    node = config
    for key in path:
        node = node[key] if isinstance(node, dict) else getattr(node, key)
    assert node == value


@pytest.mark.parametrize("kind, path, info", FIELDS, ids=[f"{k}:{'.'.join(p)}" for k, p, _ in FIELDS])
def test_row_9_every_numeric_config_field_refuses_nan_inf_huge_and_wrong_types_in_one_line(kind, path, info):
    for value in HOSTILE + [bounds(info)[2], bounds(info)[0]]:
        _check(kind, path, info, value)


@FUZZ
@given(st.sampled_from(FIELDS), st.one_of(st.floats(), st.integers(-2 ** 70, 2 ** 70), st.booleans()))
def test_generated_values_for_any_numeric_field_are_in_range_or_refused_in_one_line(field, value):
    _check(*field, value)


@pytest.mark.parametrize("path, value", [(("line", "deadline_ms"), math.inf), (("link", "ack_timeout_s"), math.inf),
                                         (("link", "heartbeat_interval_s"), 1e-9),
                                         (("storage", "archive", "quota_mb"), math.inf),
                                         (("model", "size"), 10 ** 6)])
def test_row_9_the_reported_settings_are_refused(path, value):
    with pytest.raises(ConfigError, match=path[-1]):
        parse_config(_set(base_config(), path, value))


@pytest.mark.parametrize("key, value", [("rcvhwm", 10 ** 9), ("max_message_bytes", 2 ** 40), ("max_pixels", 10 ** 12),
                                        ("poll_interval_s", math.inf), ("poll_interval_s", math.nan),
                                        ("rcvhwm", True)])
def test_zmq_source_numbers_are_bounded(key, value):
    with pytest.raises(ConfigError, match=key):
        parse_config(_set(base_config(), ("source", key), value))


# --- disk: the archive's floor and names ---------------------------------------------------------------------

def part(part_id: str, seq: int, capture_time: float = 1_780_000_000.123) -> PartRecord:
    record = PartRecord(part_id=part_id, recipe="default", capture_time=capture_time, capture_monotonic=0.0)
    record.image = np.random.default_rng(seq).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    record.seq = seq
    return record.decide(Verdict.REJECT, Reason.ANOMALY, "test")


def test_row_16_two_ids_that_sanitise_alike_in_one_millisecond_keep_two_files(tmp_path):
    with RejectArchive(tmp_path, 1 << 20) as archive:
        archive.submit(part("LOT/7", 7))
        archive.submit(part("LOT 7", 8))
    files = sorted(p for p in tmp_path.rglob("*.png"))
    assert len(files) == 2 and files[0].read_bytes() != files[1].read_bytes()
    assert sorted(parse_archive_name(p.name).seq for p in files) == [7, 8]
    assert {parse_archive_name(p.name).part_id for p in files} == {"LOT-7"}


class Disk:
    """A file system of ``total`` bytes holding ``other`` bytes besides the archive's own files."""

    def __init__(self, root: Path, total: int, other: int) -> None:
        self.root, self.total, self.other = root, total, other

    def __call__(self, path: Path) -> tuple[int, int]:
        archive = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return self.total, self.total - self.other - archive


def test_row_15_the_archive_never_takes_the_last_tenth_of_the_disk(tmp_path):
    alarms: list[str] = []
    one = len(cv2.imencode(".png", part("x", 1).image)[1])
    disk = Disk(tmp_path, total=100 * one, other=80 * one)     # 20 % free, the quota far larger than the disk
    with RejectArchive(tmp_path, 1 << 40, min_free_fraction=0.1, disk_usage=disk, on_alarm=alarms.append) as archive:
        for seq in range(1, 31):
            archive.submit(part(f"p{seq}", seq, 1_780_000_000 + seq))
    free = disk(tmp_path)[1]
    assert free >= 0.1 * disk.total                  # the floor held while 30 parts were offered
    kept = sorted(parse_archive_name(p.name).seq for p in tmp_path.rglob("*.png"))
    assert kept and kept[-1] == 30 and kept == list(range(31 - len(kept), 31))   # the newest, oldest deleted
    assert archive.counters().refused_disk == 0 and not alarms

    disk.other = 95 * one                            # the ledger grew: the archive gives up all it has, then refuses
    with RejectArchive(tmp_path, 1 << 40, min_free_fraction=0.1, disk_usage=disk, on_alarm=alarms.append) as archive:
        for seq in range(31, 34):
            archive.submit(part(f"p{seq}", seq, 1_780_000_000 + seq))
    assert not list(tmp_path.rglob("*.png"))
    assert archive.counters().refused_disk == 3 and len(alarms) == 1 and "free-space floor" in alarms[0]


def test_the_free_space_floor_is_a_bounded_config_key():
    assert parse_config(base_config()).storage.archive.min_free_percent == 10
    for value in (-1, 95, math.nan):
        with pytest.raises(ConfigError, match="min_free_percent"):
            parse_config(_set(base_config(), ("storage", "archive", "min_free_percent"), value))


# --- pool files ------------------------------------------------------------------------------------------------

class Pool:
    def __init__(self) -> None:
        self.state: dict | None = None

    def load_state(self, state: dict) -> None:
        self.state = state


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "identity not an object"])
def test_row_17_a_damaged_pool_file_falls_back_to_the_previous_good_one_with_an_alarm(tmp_path, damage):
    path = tmp_path / "pools" / "default.npz"
    save_pool(path, {"members": np.arange(10.0)}, {"model": "m"})
    save_pool(path, {"members": np.arange(20.0)}, {"model": "m"})
    assert previous_path(path).is_file()
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 2], "empty": b"", "garbage": b"PK\x03\x04" * 9,
                      "identity not an object": _npz(identity=np.array(json.dumps(["m"])), members=np.arange(5.0)),
                      }[damage])
    alarms: list[str] = []
    pool = Pool()
    assert load_pool(path, pool, {"model": "m"}, alarms.append)
    assert np.array_equal(pool.state["members"], np.arange(10.0)) and len(alarms) == 1
    save_pool(path, {"members": np.arange(30.0)}, {"model": "m"})   # the next save: a good file again
    pool = Pool()
    assert load_pool(path, pool, {"model": "m"}, alarms.append) and len(pool.state["members"]) == 30
    assert len(alarms) == 1


def test_a_pool_file_deleted_on_purpose_starts_an_empty_pool_even_with_a_previous_one_beside_it(tmp_path):
    path = tmp_path / "pools" / "default.npz"
    save_pool(path, {"members": np.arange(10.0)}, {"model": "m"})
    save_pool(path, {"members": np.arange(20.0)}, {"model": "m"})
    path.unlink()   # the documented way to start empty
    alarms: list[str] = []
    assert not load_pool(path, Pool(), {"model": "m"}, alarms.append) and not alarms


def test_row_17_with_no_good_pool_file_the_recipe_warms_up_again_with_an_alarm(tmp_path):
    path = tmp_path / "pools" / "default.npz"
    save_pool(path, {"members": np.arange(10.0)}, {"model": "m"})
    path.write_bytes(path.read_bytes()[:100])
    alarms: list[str] = []
    assert not load_pool(path, Pool(), {"model": "m"}, alarms.append)
    assert "empty pool" in alarms[0] and (tmp_path / "pools" / "default.npz.corrupt").is_file()


# --- source config: every numeric key of every source type ---------------------------------------------------

def test_every_source_type_s_numeric_keys_are_walked_like_the_rest_of_the_config():
    """The sources are a typed union in the line config (edge_app/sources/configs.py): the walk above holds
    every numeric key of every source type to the one policy, as it does the links'."""
    walked = {kind.removeprefix("source:") for kind, _, _ in FIELDS if kind.startswith("source:")}
    assert walked == set(SOURCE_TYPES)
    keys = {path[-1] for kind, path, _ in FIELDS if kind == "source:genicam"}
    assert {"max_pixels", "part_digits", "buffers", "frame_timeout_s", "packet_size"} <= keys
