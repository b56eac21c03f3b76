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
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
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
from .configs import SOURCE_TYPES, PartIds, SourceConfig, parse_source_config  # noqa: F401  (re-exported)
from .errors import SourceConfigError, SourceError, UndecodableFrame, require  # noqa: F401  (re-exported)

D = TypeVar("D", bound="Device")


class SourceNotOpenError(SourceError):
    """``parts()`` was used before ``open()`` or after ``close()``."""


class DecodeError(ValueError):
    """A frame cannot become an RGB uint8 image: empty, corrupt, truncated or of the wrong shape."""


def source_class(config: SourceConfig) -> type[FrameSource]:
    """The ``FrameSource`` class of a validated config's ``type``, its module imported now (on demand)."""
    module, name = SOURCE_TYPES[config.type]
    return getattr(importlib.import_module(module), name)


def source_config(config: Mapping[str, Any] | SourceConfig) -> SourceConfig:
    """The validated config of a source section; ``SourceConfigError`` names the bad key."""
    return parse_source_config(config)


def make_source(config: Mapping[str, Any] | SourceConfig) -> FrameSource:
    """The frame source described by ``config`` (a validated config, or a mapping whose ``type`` is one of
    :data:`SOURCE_TYPES`); only that type's module is imported."""
    config = parse_source_config(config)
    return source_class(config)(config)


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

    def resume(self, source_refs: Iterable[str | None]) -> None:
        """Pick up where the last run's ledger ends (its newest rows' ``source_ref``, oldest first), before
        ``parts()``. A source whose frames are numbered uses it to give a row to the frames the last run never
        recorded; the others have nothing to resume."""

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
