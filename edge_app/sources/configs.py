"""The frame sources' configs: one pydantic model per ``type``, the line config's ``source`` section a typed union.

Like the reject links (edge_app/links/__init__.py), a ``source`` section is picked by its ``type``
(:data:`SourceSection`, a discriminated union) and follows the one config policy (edge_app/strict_model.py):
unknown keys refused, every number finite and within the range its field states. Checks a type cannot state
(one of two keys, a path template, a camera name) are each model's :meth:`SourceConfig.check`.

This module imports no implementation: :data:`SOURCE_TYPES` names each type's module, which
:func:`musc_edge.edge.sources.base.make_source` imports only when a line opens that source.

A model built directly (``ReplayConfig(path=...)``) or by :func:`parse_source_config` raises
:class:`SourceConfigError` naming the key; inside the line config, the line config's own error names it.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from ..mediaio import DEFAULT_MAX_PIXELS, HARD_MAX_PIXELS, pixel_budget_problem
from ..strict_model import MAX_DURATION_S, StrictModel
from .errors import SourceConfigError, UndecodableFrame, require
from .pixel_formats import FORMATS

# The implementation of each type: (module, class), imported on demand (edge_app/sources/base.py: make_source).
SOURCE_TYPES = {
    "replay": ("musc_edge.edge.sources.replay", "ReplaySource"),
    "opencv": ("musc_edge.edge.sources.opencv_camera", "OpenCVCameraSource"),
    "zmq": ("musc_edge.edge.sources.zmq_source", "ZmqSource"),
    "genicam": ("musc_edge.edge.sources.genicam", "GenICamSource"),
}

OPENCV_TRIGGER_MODES = ("free_run", "software")
GENICAM_TRIGGER_MODES = ("free_run", "software", "hardware")
TRIGGER_ACTIVATIONS = ("RisingEdge", "FallingEdge", "AnyEdge", "LevelHigh", "LevelLow")
MAX_MESSAGE_BYTES = 1 << 30   # a 4096 x 4096 float64 cloud and its image fit; ZeroMQ refuses anything larger
MAX_COUNT = 2 ** 63 - 1       # counters and limits: within 64 bits
MAX_POLL_S = 60.0             # the longest a receive loop waits before it checks for close()


class PartIds:
    """Part ids ``prefix + zero-padded counter``: ``PartIds("part", 6)`` gives part000001, part000002, ..."""

    def __init__(self, prefix: str = "part", digits: int = 6, start: int = 1) -> None:
        self.prefix, self.digits = prefix, digits
        self._counter = itertools.count(start)

    def next(self) -> str:
        return f"{self.prefix}{next(self._counter):0{self.digits}d}"


class SourceConfig(StrictModel):
    """Keys every source understands. ``type`` (each subclass's) picks the implementation."""

    recipe: str = "default"
    part_prefix: str = "part"
    part_digits: int = Field(6, ge=1, le=20)
    part_start: int = Field(1, ge=0, lt=2 ** 62)      # counter value of the first generated part id
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, le=HARD_MAX_PIXELS)   # frames declaring more are refused

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SourceConfigError(_describe(exc, type(self), data)) from None

    @model_validator(mode="after")
    def _checked(self) -> SourceConfig:
        self.check()
        return self

    def check(self) -> None:
        """What the field types cannot state; raises ``SourceConfigError`` naming the key."""
        require(self.recipe != "", "recipe", self.recipe, "a non-empty string")

    def over_budget(self, raw: bytes) -> bytes:
        """``raw``, or an UndecodableFrame when its header declares more than ``max_pixels``."""
        problem = None if isinstance(raw, UndecodableFrame) else pixel_budget_problem(raw, self.max_pixels)
        return raw if problem is None else UndecodableFrame(raw[:64], problem)

    def part_ids(self) -> PartIds:
        """The part id generator this config describes."""
        return PartIds(self.part_prefix, self.part_digits, self.part_start)


class ReplayConfig(SourceConfig):
    """Set exactly one of ``path`` (a folder of images or a video file) and ``paths`` (frames in order)."""

    type: Literal["replay"] = "replay"
    path: str | None = None
    paths: list[str] | None = None
    pattern: str = "*"              # folder only, e.g. "**/rgb/*.png"; files are also filtered to IMAGE_SUFFIXES
    recursive: StrictBool = False   # folder only: match ``pattern`` in every subfolder
    rate: float | None = Field(1.0, gt=0, le=1e6)   # parts per second; None = as fast as the consumer takes them
    shuffle: StrictBool = False     # seeded; a new permutation on each pass when looping
    seed: int = Field(0, ge=0, le=MAX_COUNT)
    limit: int | None = Field(None, ge=1, le=MAX_COUNT)        # total parts, across passes
    loop: StrictBool = False        # replay forever (a development camera); otherwise the line stops at the end
    encoder_counts_per_part: int | None = Field(None, ge=1, le=MAX_COUNT)   # simulated encoder; None: none
    encoder_start: int = Field(0, ge=0, le=MAX_COUNT)
    encoder_rollover: int = Field(2 ** 32, ge=1, le=MAX_COUNT)
    cloud_path: str | None = None   # image files only: e.g. "../xyz/{stem}.tiff", relative to the image's folder

    @field_validator("path", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    def check(self) -> None:
        super().check()
        if (self.path is None) == (self.paths is None):
            raise SourceConfigError("replay source config needs exactly one of the keys 'path' and 'paths', "
                                    f"got path={self.path!r}, paths={self.paths!r}")
        require(self.paths is None or len(self.paths) > 0, "paths", self.paths, "a non-empty list of file paths")
        require(self.cloud_path is None or _valid_template(self.cloud_path), "cloud_path", self.cloud_path,
                "a path template using {stem} or {name}, e.g. '../xyz/{stem}.tiff'")


def _valid_template(template: object) -> bool:
    if not isinstance(template, str) or not ("{stem}" in template or "{name}" in template):
        return False
    try:
        template.format(stem="000", name="000.png")
    except (KeyError, IndexError, ValueError):
        return False
    return True


class OpenCVCameraConfig(SourceConfig):
    type: Literal["opencv"] = "opencv"
    device: StrictInt | str         # index, video file, RTSP URL, or GStreamer pipeline (contains '!')
    width: int | None = Field(None, ge=1, le=100_000)
    height: int | None = Field(None, ge=1, le=100_000)
    fps: float | None = Field(None, gt=0, le=10_000)
    trigger: str = "free_run"       # "free_run" | "software"
    buffer_size: int | None = Field(None, ge=1, le=10_000)   # CAP_PROP_BUFFERSIZE; 1 keeps a triggered frame fresh
    poll_interval_s: float = Field(0.1, gt=0, le=MAX_POLL_S)  # how often a waiting trigger loop checks for close()

    @field_validator("device")
    @classmethod
    def _camera_index(cls, value: int | str) -> int | str:
        if isinstance(value, str) and value.isdigit():
            return int(value)  # "0" from a command line means camera 0, not a file named 0
        return value

    def check(self) -> None:
        super().check()
        require(self.device != "", "device", self.device, "a camera index, a file path, a URL or a GStreamer pipeline")
        require(self.trigger in OPENCV_TRIGGER_MODES, "trigger", self.trigger,
                f"one of {', '.join(OPENCV_TRIGGER_MODES)}")

    @property
    def is_pipeline(self) -> bool:
        return isinstance(self.device, str) and "!" in self.device

    @property
    def is_file(self) -> bool:
        return isinstance(self.device, str) and os.path.isfile(self.device)


class ZmqSourceConfig(SourceConfig):
    type: Literal["zmq"] = "zmq"
    endpoint: str                       # e.g. tcp://127.0.0.1:5555, ipc:///run/musc/frames
    bind: StrictBool = True             # bind the PULL socket (senders connect), or connect to a binding sender
    rcvhwm: int = Field(64, ge=1, le=1_000_000)   # messages queued before senders block
    max_message_bytes: int = Field(64 << 20, ge=1, le=MAX_MESSAGE_BYTES)   # larger ones are refused by ZeroMQ
    poll_interval_s: float = Field(0.1, ge=0.001, le=MAX_POLL_S)   # how often an idle receive loop checks for close()
    max_gap_rows: int = Field(64, ge=0, le=1_000_000)   # numbered frames lost within a minute past this: an alarm

    def check(self) -> None:
        super().check()
        require("://" in self.endpoint, "endpoint", self.endpoint, "a ZeroMQ endpoint such as 'tcp://127.0.0.1:5555'")


class GenICamConfig(SourceConfig):
    """A GenICam camera's settings; ``None`` leaves the camera's own value."""

    type: Literal["genicam"] = "genicam"
    camera: str                             # device id, serial number, or IP address (GigE Vision)
    pixel_format: str | None = None         # PFNC name, one of pixel_formats.FORMATS
    exposure_us: float | None = Field(None, gt=0, le=1e8)
    gain: float | None = Field(None, ge=0, le=1e4)   # Gain (dB) where the camera has it, else GainRaw
    roi: list[StrictInt] | None = None      # [offset_x, offset_y, width, height]
    frame_rate: float | None = Field(None, gt=0, le=1e6)   # AcquisitionFrameRate (free run)
    trigger: str = "free_run"               # free_run | software (trigger()) | hardware (trigger_source)
    trigger_source: str = "Line0"           # hardware trigger input, e.g. the photo eye on Line0 / Line1
    trigger_activation: str = "RisingEdge"
    packet_size: int | None = Field(None, ge=576, le=65_535)   # GigE: GevSCPSPacketSize (9000 with jumbo frames)
    packet_delay_ns: int | None = Field(None, ge=0, le=2 ** 32 - 1)   # GigE: inter-packet delay
    packet_resend: StrictBool = True        # GigE: ask the camera to resend lost packets
    socket_buffer_bytes: int | None = Field(None, ge=1, le=2 ** 31 - 1)   # GigE: receive socket buffer
    packet_socket: StrictBool = True        # GigE: Aravis' AF_PACKET receive path where allowed (not on loopback)
    features: dict[str, Any] = Field(default_factory=dict)   # any other feature: name -> value, set last
    encoder_chunk: str | None = None        # chunk holding the encoder count, e.g. EncoderValue
    multipart: StrictBool = False           # GigE Vision multi-part: a 2D and a 3D component in each buffer
    buffers: int = Field(8, ge=2, le=256)   # stream buffer pool
    frame_timeout_s: float = Field(2.0, gt=0, le=MAX_DURATION_S)   # a software trigger's frame is missed
    reconnect_interval_s: float = Field(1.0, gt=0, le=MAX_DURATION_S)
    max_gap_rows: int = Field(64, ge=0, le=1_000_000)   # missing frame ids beyond this give one alarm, not rows
    gap_timeout_s: float = Field(0.5, gt=0, le=MAX_DURATION_S)   # a skipped frame id not arrived by then is missing
    max_parts: int | None = Field(None, ge=1, le=MAX_COUNT)   # end after this many parts (bench runs and tests)
    poll_interval_s: float = Field(0.1, gt=0, le=MAX_POLL_S)   # how often the stream loop checks for close()

    def check(self) -> None:
        super().check()
        require(self.camera.strip() != "", "camera", self.camera, "a device id, serial number or IP address")
        require(self.pixel_format is None or self.pixel_format in FORMATS, "pixel_format", self.pixel_format,
                f"null or one of {', '.join(FORMATS)}")
        require(self.roi is None or (len(self.roi) == 4 and all(v >= 0 for v in self.roi) and self.roi[2] > 0
                                     and self.roi[3] > 0), "roi", self.roi,
                "null or [offset_x, offset_y, width, height] with width, height > 0")
        require(self.trigger in GENICAM_TRIGGER_MODES, "trigger", self.trigger,
                f"one of {', '.join(GENICAM_TRIGGER_MODES)}")
        require(self.trigger_source != "", "trigger_source", self.trigger_source, "a trigger input name such as Line0")
        require(self.trigger_activation in TRIGGER_ACTIVATIONS, "trigger_activation", self.trigger_activation,
                f"one of {', '.join(TRIGGER_ACTIVATIONS)}")
        require(all(isinstance(k, str) and k for k in self.features)
                and all(isinstance(v, (bool, int, float, str)) for v in self.features.values()), "features",
                self.features, "a mapping of feature names to booleans, numbers or strings")
        require(self.encoder_chunk is None or self.encoder_chunk.isidentifier(),
                "encoder_chunk", self.encoder_chunk, "null or a chunk name such as EncoderValue")
        require(self.trigger != "free_run" or self.frame_rate is None or self.frame_rate * self.frame_timeout_s > 1,
                "frame_timeout_s", self.frame_timeout_s, f"longer than a frame period at frame_rate {self.frame_rate} "
                "(free run reopens a camera that sends no frame for frame_timeout_s)")


AnySourceConfig = Union[ReplayConfig, OpenCVCameraConfig, ZmqSourceConfig, GenICamConfig]
SourceSection = Annotated[AnySourceConfig, Field(discriminator="type")]
"""The line config's ``source`` section: the model its ``type`` names."""
_BY_TYPE: dict[str, type[SourceConfig]] = {cls.model_fields["type"].default: cls
                                           for cls in (ReplayConfig, OpenCVCameraConfig, ZmqSourceConfig,
                                                       GenICamConfig)}


def parse_source_config(raw: Mapping[str, Any] | SourceConfig) -> SourceConfig:
    """The validated config of a ``source`` section (a model is returned as it is); ``SourceConfigError``
    names the bad key."""
    if isinstance(raw, SourceConfig):
        return raw
    if not isinstance(raw, Mapping):
        raise SourceConfigError(f"source config must be a mapping, got {type(raw).__name__}")
    if "type" not in raw:
        raise SourceConfigError(f"source config is missing key 'type' (one of: {', '.join(SOURCE_TYPES)})")
    kind = raw["type"]
    if not isinstance(kind, str) or kind not in _BY_TYPE:
        raise SourceConfigError(f"source config key 'type' is {kind!r}; expected one of: {', '.join(SOURCE_TYPES)}")
    bad = [key for key in raw if not isinstance(key, str)]
    if bad:
        raise SourceConfigError(f"unknown source config key {bad[0]!r} for type {kind!r}")
    return _BY_TYPE[kind](**raw)


_EXPECTED = {"bool_type": "true or false", "string_type": "a string", "list_type": "a list",
             "dict_type": "a mapping", "int_type": "an integer", "float_type": "a number"}


def _describe(exc: ValidationError, cls: type[SourceConfig], data: Mapping[str, Any]) -> str:
    """One line naming each bad key, in the words the sources have always used."""
    kind = cls.model_fields["type"].default if "type" in cls.model_fields else None
    known = sorted(name for name in cls.model_fields if name != "type")
    problems: list[str] = []
    expected_of: dict[str, list[str]] = {}   # key -> what it must be (a union's members: several)
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else None
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown source config key {key!r} for type {kind!r} (known keys: {', '.join(known)})")
        elif error["type"] == "missing":
            problems.append(f"source config of type {kind!r} is missing key {key!r}")
        elif error["type"] == "value_error" and message.startswith(("source config", "replay source")):
            problems.append(message)
        elif key is None:
            problems.append(f"source config of type {kind!r}: {message}")
        else:
            expected_of.setdefault(key, []).append(_EXPECTED.get(error["type"], message.removeprefix("Input should be ")))
    problems += [f"source config key {key!r} must be {' or '.join(dict.fromkeys(expected))}, got {data.get(key)!r}"
                 for key, expected in expected_of.items()]
    return "; ".join(problems)
