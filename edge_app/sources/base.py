"""What every frame source shares: the lifecycle and timing contract, part ids, config parsing, decoding.

A source turns triggers or received frames into :class:`~musc_edge.edge.record.PartRecord` objects. Decoding is
a separate, separately timed stage: sources hand over encoded bytes in ``record.raw`` where they receive
them, and :func:`decode_part` fills ``record.image``.

>>> source = make_source({"type": "replay", "path": "frames/", "rate": 2.0, "recipe": "bottle"})
>>> with source:
...     for part in source.parts():
...         decode_part(part)          # raises DecodeError for corrupt / truncated frames
"""
from __future__ import annotations

import importlib
import itertools
import math
import threading
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .. import mediaio
from ..mediaio import (  # noqa: F401  (re-exported: the sources' names for the shared I/O layer)
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    JPEG_SOI,
    PNG_SIGNATURE,
    MediaError,
    pixel_budget_problem,
)
from ..record import PartRecord
from ..strict_model import numeric_annotation

# Implementations by config "type": (module, class), looked up with importlib because they import this
# module. Not on demand in practice: the package's __init__ imports every one of them.
SOURCE_TYPES = {
    "replay": ("musc_edge.edge.sources.replay", "ReplaySource"),
    "opencv": ("musc_edge.edge.sources.opencv_camera", "OpenCVCameraSource"),
    "zmq": ("musc_edge.edge.sources.zmq_source", "ZmqSource"),
    "genicam": ("musc_edge.edge.sources.genicam", "GenICamSource"),
}


class SourceError(RuntimeError):
    """A source cannot be opened or stopped delivering frames."""


class SourceConfigError(SourceError, ValueError):
    """A source configuration is incomplete or has an invalid key or value."""


class SourceNotOpenError(SourceError):
    """``parts()`` was used before ``open()`` or after ``close()``."""


class DecodeError(ValueError):
    """A frame cannot become an RGB uint8 image: empty, corrupt, truncated or of the wrong shape."""


class UndecodableFrame(bytes):
    """Frame bytes a source already knows to be unusable; ``decode_part`` raises ``DecodeError(reason)``.

    Lets a source hand a malformed frame on as a part (so it gets its NO_VERDICT) instead of dropping it,
    while keeping whatever bytes arrived for the archive.
    """

    reason: str

    def __new__(cls, payload: bytes, reason: str) -> UndecodableFrame:
        frame = super().__new__(cls, payload)
        frame.reason = reason
        return frame


class PartIds:
    """Part ids ``prefix + zero-padded counter``: ``PartIds("part", 6)`` gives part000001, part000002, ..."""

    def __init__(self, prefix: str = "part", digits: int = 6, start: int = 1) -> None:
        self.prefix, self.digits = prefix, digits
        self._counter = itertools.count(start)

    def next(self) -> str:
        return f"{self.prefix}{next(self._counter):0{self.digits}d}"


@dataclass(kw_only=True)
class SourceConfig:
    """Keys every source understands. ``type`` picks the implementation in :func:`make_source`."""

    recipe: str = "default"
    part_prefix: str = "part"
    part_digits: int = 6
    part_start: int = 1             # counter value of the first generated part id
    max_pixels: int = DEFAULT_MAX_PIXELS   # frames whose header declares more are refused before decoding

    def __post_init__(self) -> None:
        require(isinstance(self.recipe, str) and self.recipe != "", "recipe", self.recipe, "a non-empty string")
        require(isinstance(self.part_prefix, str), "part_prefix", self.part_prefix, "a string")
        require(_is_int(self.part_digits) and 1 <= self.part_digits <= 20, "part_digits", self.part_digits,
                "an integer in 1..20")
        require(_is_int(self.part_start) and 0 <= self.part_start < 2 ** 62, "part_start", self.part_start,
                "an integer in 0..2**62")
        require(_is_int(self.max_pixels) and 0 < self.max_pixels <= mediaio.HARD_MAX_PIXELS, "max_pixels",
                self.max_pixels, f"an integer in 1..{mediaio.HARD_MAX_PIXELS}")

    def over_budget(self, raw: bytes) -> bytes:
        """``raw``, or an UndecodableFrame when its header declares more than ``max_pixels``."""
        problem = None if isinstance(raw, UndecodableFrame) else pixel_budget_problem(raw, self.max_pixels)
        return raw if problem is None else UndecodableFrame(raw[:64], problem)

    def part_ids(self) -> PartIds:
        return PartIds(self.part_prefix, self.part_digits, self.part_start)


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise ``SourceConfigError`` naming ``key`` and ``value`` unless ``ok``."""
    if not ok:
        raise SourceConfigError(f"source config key {key!r} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


C = TypeVar("C", bound=SourceConfig)
D = TypeVar("D", bound="Device")


def config_from_dict(cls: type[C], config: Mapping[str, Any]) -> C:
    """Build the config dataclass ``cls`` from a mapping, naming any unknown or missing key."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(config) - known - {"type"})
    if unknown:
        raise SourceConfigError(f"unknown source config key {unknown[0]!r} for type {config.get('type')!r} "
                                f"(known keys: {', '.join(sorted(known))})")
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in config:
            raise SourceConfigError(f"source config of type {config.get('type')!r} is missing key {f.name!r}")
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):   # an annotation that does not resolve here: the source checks its own keys
        hints = {}
    for key, value in config.items():
        if key in known and numeric_annotation(hints.get(key)) and value is not None:
            require(_is_number(value), key, value, "a finite number within 64 bits (not true/false, not text)")
    return cls(**{key: value for key, value in config.items() if key != "type"})


def _is_number(value: Any) -> bool:
    """The numeric policy of every source key (the line config's, edge_app/strict_model.py): a finite int or
    float, not a bool, within 64 bits; each source's own checks then hold it to its range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and abs(value) < 2 ** 63


def source_class(config: Mapping[str, Any]) -> type[FrameSource]:
    """The ``FrameSource`` class that ``config["type"]`` names (``replay``, ``opencv`` or ``zmq``)."""
    if not isinstance(config, Mapping):
        raise SourceConfigError(f"source config must be a mapping, got {type(config).__name__}")
    if "type" not in config:
        raise SourceConfigError(f"source config is missing key 'type' (one of: {', '.join(SOURCE_TYPES)})")
    kind = config["type"]
    if kind not in SOURCE_TYPES:
        raise SourceConfigError(f"source config key 'type' is {kind!r}; expected one of: {', '.join(SOURCE_TYPES)}")
    module, name = SOURCE_TYPES[kind]
    return getattr(importlib.import_module(module), name)


def source_config(config: Mapping[str, Any]) -> SourceConfig:
    """The validated config dataclass of a source section; ``SourceConfigError`` names the bad key."""
    return config_from_dict(source_class(config).config_class, config)


def make_source(config: Mapping[str, Any]) -> FrameSource:
    """The frame source described by ``config``; ``config["type"]`` is ``replay``, ``opencv`` or ``zmq``."""
    return source_class(config)(source_config(config))


def glob_files(folder: str | Path, pattern: str, recursive: bool, suffixes: tuple[str, ...]) -> list[Path]:
    """Sorted files under ``folder`` matching ``pattern`` whose suffix is one of ``suffixes``; never empty."""
    root = Path(folder)
    if not root.is_dir():
        raise SourceConfigError(f"source folder {str(root)!r} does not exist or is not a folder")
    matches = root.rglob(pattern) if recursive else root.glob(pattern)
    found = sorted(p for p in matches if p.suffix.lower() in suffixes and p.is_file())
    if not found:
        raise SourceConfigError(f"no {'/'.join(suffixes)} files match {pattern!r} in {str(root)!r}"
                                f"{' (recursive)' if recursive else ''}")
    return found


class Device(ABC):
    """Open/close lifecycle shared by frame sources and scanners; ``close()`` may come from any thread.

    Subclasses implement ``_acquire`` (open the device), ``_release`` (free it; called once) and run their
    generators through ``_guarded`` so that a ``close()`` during iteration leaves the release to the
    iterating thread (device handles such as sockets are not thread-safe).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._open = False
        self._iterating = False

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        """Acquire the device. Raises ``SourceError`` naming the device when it cannot be opened."""
        with self._lock:
            if self._open:
                return
            self._stop.clear()
            self._acquire()
            self._open = True

    def close(self) -> None:
        """Stop iteration (the generator returns without yielding more) and release the device."""
        with self._lock:
            self._stop.set()
            if self._open and not self._iterating:
                self._release_once()

    def __enter__(self: D) -> D:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guarded(self, items: Iterator) -> Iterator:
        with self._lock:
            if not self._open or self._stop.is_set():
                raise SourceNotOpenError(f"{type(self).__name__} is not open: call open() first")
            if self._iterating:
                raise SourceError(f"{type(self).__name__} is already being iterated by another consumer")
            self._iterating = True
        try:
            yield from items
        finally:
            with self._lock:
                self._iterating = False
                if self._stop.is_set() and self._open:
                    self._release_once()

    def _release_once(self) -> None:
        self._open = False
        self._release()

    @abstractmethod
    def _acquire(self) -> None: ...

    def _release(self) -> None:
        """Free the device; default: nothing to free."""


class FrameSource(Device):
    """A camera, a replayed folder or a frame socket, seen as a stream of parts.

    Lifecycle: constructing touches no device; ``open()`` acquires it and raises ``SourceError`` naming it
    when that fails; ``close()`` (any thread) ends ``parts()`` and releases it. Also a context manager.

    Timing contract of ``parts()``:

    * A blocking generator, drained by one dedicated thread. Each ``next()`` blocks until the next part
      has been captured and returns it at once. One trigger gives exactly one ``PartRecord``: a frame that
      arrives damaged still becomes a record, whose ``decode_part`` raises ``DecodeError``.
    * ``capture_monotonic`` is the ``time.monotonic()`` instant of capture, never of the yield, and
      ``capture_time`` the same instant in UTC epoch seconds. A source never waits for its consumer to set
      its pace: a consumer that falls behind receives parts late but with their true capture times, so
      ``time.monotonic() - capture_monotonic`` is its lag against the part's deadline.
    * Encoded frames travel as ``raw`` bytes (decoded later by ``decode_part``, its own timed stage);
      sources that only get pixel arrays set ``image`` (RGB uint8) and leave ``raw`` None.
    * The generator ends when the source is exhausted, or within ``poll_interval_s`` (about 0.1 s) of
      ``close()``. One iteration at a time.
    """

    config_class: type[SourceConfig] = SourceConfig

    def __init__(self, config: SourceConfig) -> None:
        super().__init__()
        self.config = config

    def parts(self) -> Iterator[PartRecord]:
        """Parts as they are captured (see the class docstring for the timing contract)."""
        return self._guarded(self._iterate())

    @property
    def finite(self) -> bool:
        """Whether ``parts()`` ends by itself (a replay without ``loop``). A live source's ``parts()`` ends only
        at ``close()``: the line takes any other end, and any exception, as a failure and reopens it."""
        return False

    def describe(self) -> str:
        """What this source is, for alarms and the end-of-run line (e.g. ``replay of frames/``)."""
        return type(self).__name__

    @abstractmethod
    def _iterate(self) -> Iterator[PartRecord]: ...


def frame_to_rgb(frame: np.ndarray, where: str) -> np.ndarray:
    """An OpenCV frame (gray, BGR or BGRA, uint8) as RGB uint8 ``[H, W, 3]``; 3-channel frames in place."""
    try:
        return mediaio.frame_to_rgb(frame, where)
    except MediaError as exc:
        raise DecodeError(str(exc)) from None


def decode_image(raw: bytes, where: str, max_pixels: int = mediaio.HARD_MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG/BMP bytes -> RGB uint8 ``[H, W, 3]`` (edge_app/mediaio.py); ``DecodeError`` naming ``where``
    otherwise. Sources hold frames to their own ``max_pixels`` when the part is created; this is the
    last, hard limit."""
    if isinstance(raw, UndecodableFrame):
        raise DecodeError(f"{where}: {raw.reason}")
    try:
        return mediaio.decode_image(raw, where, max_pixels)
    except MediaError as exc:
        raise DecodeError(str(exc)) from None


def check_image(image: np.ndarray, where: str) -> np.ndarray:
    """``image`` itself if it is RGB uint8 ``[H, W, 3]`` with a non-empty area, else ``DecodeError``."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise DecodeError(f"{where}: expected an RGB uint8 [H, W, 3] image, got {type(image).__name__} "
                          f"shape={shape} dtype={getattr(image, 'dtype', None)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise DecodeError(f"{where}: empty image of shape {image.shape}")
    return image


def decode_part(record: PartRecord) -> PartRecord:
    """Fill ``record.image`` (RGB uint8) from ``record.raw``, or check the image a source already set.

    Raises ``DecodeError`` with a message naming the part and its source for empty, corrupt, truncated
    (PNG without IEND, JPEG without EOI) or wrongly shaped frames.
    """
    where = f"part {record.part_id}" + (f" ({record.source_ref})" if record.source_ref else "")
    if record.image is not None:
        check_image(record.image, where)
    elif record.raw is not None:
        record.image = check_image(decode_image(record.raw, where), where)
    else:
        raise DecodeError(f"{where}: no frame (neither raw bytes nor an image)")
    return record
