"""OpenCV ``VideoCapture`` source: a camera index, a video file, an RTSP URL or a GStreamer pipeline.

Free-run (every frame is a part) or software-triggered (one frame per :meth:`OpenCVCameraSource.trigger`).
Frames arrive as pixel arrays, so parts carry ``image`` (RGB uint8) and no ``raw`` bytes. PyPI OpenCV wheels
are built without GStreamer: on a Jetson, pipelines such as ``nvarguscamerasrc ! ... ! appsink`` need
JetPack's system OpenCV.

>>> camera = OpenCVCameraSource(OpenCVCameraConfig(device=0, width=1280, height=720, trigger="software"))
"""
from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator

import cv2
import numpy as np

from ..record import PartRecord
from .base import (
    DecodeError,
    FrameSource,
    SourceError,
    UndecodableFrame,
    frame_to_rgb,
)
from .configs import OPENCV_TRIGGER_MODES, OpenCVCameraConfig

TRIGGER_MODES = OPENCV_TRIGGER_MODES


class OpenCVCameraSource(FrameSource):
    """Parts from ``cv2.VideoCapture``; opened lazily by ``open()``.

    Capture times: in free-run, the instant ``read()`` returned the frame; with a software trigger, the
    instant of the ``trigger()`` call (when the part was at the camera).
    """

    config: OpenCVCameraConfig

    def __init__(self, config: OpenCVCameraConfig) -> None:
        super().__init__(config)
        self._capture: cv2.VideoCapture | None = None
        self._triggers: queue.Queue[tuple[str | None, int | None, float, float]] = queue.Queue()

    def trigger(self, part_id: str | None = None, encoder: int | None = None) -> None:
        """Request one frame (software-trigger mode); thread-safe. ``part_id`` defaults to the counter."""
        if self.config.trigger != "software":
            raise SourceError(f"trigger() needs source config trigger='software', not {self.config.trigger!r}")
        self._triggers.put((part_id, encoder, time.monotonic(), time.time()))

    def _acquire(self) -> None:
        c = self.config
        backend = cv2.CAP_GSTREAMER if c.is_pipeline else cv2.CAP_ANY
        capture = cv2.VideoCapture(c.device, backend)
        if not capture.isOpened():
            capture.release()
            hint = (" (PyPI OpenCV has no GStreamer; use the system OpenCV on the Jetson)" if c.is_pipeline
                    else "")
            raise SourceError(f"cannot open OpenCV source device={c.device!r}{hint}")
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, c.width), (cv2.CAP_PROP_FRAME_HEIGHT, c.height),
                            (cv2.CAP_PROP_FPS, c.fps), (cv2.CAP_PROP_BUFFERSIZE, c.buffer_size)):
            if value is not None:
                capture.set(prop, value)
        if not c.is_file:
            actual = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            if (c.width or actual[0], c.height or actual[1]) != actual:
                capture.release()
                raise SourceError(f"OpenCV device={c.device!r} delivers {actual[0]}x{actual[1]}, "
                                  f"not the configured width={c.width} height={c.height}")
        self._capture = capture

    @property
    def finite(self) -> bool:
        """A video file ends by itself (the line then stops); a camera or pipeline ends only at ``close()``."""
        return self.config.is_file

    def describe(self) -> str:
        return f"OpenCV source {self.config.device!r}"

    def _release(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def _iterate(self) -> Iterator[PartRecord]:
        c = self.config
        ids = c.part_ids()
        ref = str(c.device)
        while not self._stop.is_set():
            if c.trigger == "software":
                try:
                    part_id, encoder, mono, utc = self._triggers.get(timeout=c.poll_interval_s)
                except queue.Empty:
                    continue
                ok, frame = self._capture.read()
            else:
                ok, frame = self._capture.read()
                part_id, encoder, mono, utc = None, None, time.monotonic(), time.time()
            if self._stop.is_set():
                return
            if not ok and c.trigger == "free_run":
                if c.is_file:
                    return
                raise SourceError(f"OpenCV device={c.device!r} stopped delivering frames")
            yield self._record(part_id or ids.next(), encoder, mono, utc, frame if ok else None, ref)

    def _record(self, part_id: str, encoder: int | None, mono: float, utc: float, frame: np.ndarray | None,
                ref: str) -> PartRecord:
        record = PartRecord(part_id=part_id, recipe=self.config.recipe, capture_time=utc, capture_monotonic=mono,
                            encoder=encoder, source_ref=ref)
        if frame is None:
            record.raw = UndecodableFrame(b"", "the camera delivered no frame for this trigger")
            return record
        try:
            record.image = frame_to_rgb(frame, ref)
        except DecodeError as exc:
            record.raw = UndecodableFrame(b"", str(exc))
        return record
