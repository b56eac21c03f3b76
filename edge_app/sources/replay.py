"""A simulated conveyor: replays a folder, an explicit list of frames or a video file at a fixed part rate.

Part ``k`` is captured at ``t0 + k / rate`` on the monotonic clock (``t0`` = start of iteration): the
schedule never drifts and never waits for the consumer, as a real conveyor doesn't. A consumer that falls
behind receives overdue parts at once, stamped with their scheduled capture times.

Image files can be replayed with their scanner frames: ``cloud_path`` says where each image's organised
point cloud is, relative to the image's folder, with ``{stem}`` (file name without suffix) and ``{name}``
filled in; ``"../xyz/{stem}.tiff"`` pairs MVTec 3D-AD's ``rgb/000.png`` with ``xyz/000.tiff``. The cloud
is read into ``PartRecord.cloud``; a missing or unreadable one decides the part NO_VERDICT / SCANNER_ERROR
naming the file, so the part is still signalled.

>>> source = ReplaySource(ReplayConfig(path="bottle/test", pattern="*/*.png", rate=4.0, shuffle=True, seed=1))
>>> scans = ReplaySource(ReplayConfig(path="tire/test", pattern="*/rgb/*.png", cloud_path="../xyz/{stem}.tiff"))
"""
from __future__ import annotations

import os
import time
from collections.abc import Generator, Iterator
from contextlib import closing
from itertools import islice
from pathlib import Path

import cv2
import numpy as np

from ..record import PartRecord, Reason, Verdict
from .base import (
    IMAGE_SUFFIXES,
    FrameSource,
    SourceConfigError,
    SourceError,
    UndecodableFrame,
    frame_to_rgb,
    glob_files,
)
from .configs import ReplayConfig  # noqa: F401  (re-exported: the replay's config)

# One frame: (source_ref, encoded bytes or None, RGB image or None)
Frame = tuple[str, bytes | None, np.ndarray | None]


def paired_cloud(image: Path, cloud_path: str) -> Path:
    """Where the cloud of ``image`` is: the ``cloud_path`` template filled in, relative to the image's folder."""
    return Path(os.path.normpath(image.parent / cloud_path.format(stem=image.stem, name=image.name)))


class ReplaySource(FrameSource):
    """Replays image files as encoded bytes (no decode here), or video frames as RGB arrays."""

    config: ReplayConfig

    def __init__(self, config: ReplayConfig) -> None:
        super().__init__(config)
        self._files: list[Path] = []
        self._video: Path | None = None

    @property
    def finite(self) -> bool:
        return not self.config.loop or self.config.limit is not None

    def describe(self) -> str:
        where = self.config.path if self.config.paths is None else f"{len(self.config.paths)} listed files"
        return f"replay of {where}"

    @property
    def frame_files(self) -> list[Path]:
        """The image files replayed, in file order (once open; empty for a video)."""
        return list(self._files)

    def _acquire(self) -> None:
        c = self.config
        if c.paths is not None:
            self._files = [Path(p) for p in c.paths]
            missing = [str(p) for p in self._files if not p.is_file()]
            if missing:
                raise SourceConfigError(f"replay source key 'paths': {len(missing)} file(s) not found, "
                                        f"first {missing[0]!r}")
        elif Path(c.path).is_file():
            if c.shuffle:
                raise SourceConfigError(f"replay source key 'shuffle' is not supported for a video ({c.path!r})")
            if c.cloud_path is not None:
                raise SourceConfigError(f"replay source key 'cloud_path' needs image files, not a video ({c.path!r})")
            capture = cv2.VideoCapture(str(c.path))
            opened = capture.isOpened()
            capture.release()
            if not opened:
                raise SourceError(f"replay source cannot open video file {str(c.path)!r}")
            self._video = Path(c.path)
        else:
            self._files = glob_files(c.path, c.pattern, c.recursive, IMAGE_SUFFIXES)

    def _iterate(self) -> Iterator[PartRecord]:
        c = self.config
        ids = c.part_ids()
        t0_mono, t0_utc = time.monotonic(), time.time()
        with closing(self._frames()) as frames:
            for k, (ref, raw, image) in enumerate(islice(frames, c.limit)):
                # The scan is read with its frame, before the part's capture time comes.
                cloud, problem = _read_scan(paired_cloud(Path(ref), c.cloud_path)) if c.cloud_path else (None, None)
                try:
                    raw = None if raw is None else c.over_budget(raw)
                except Exception as exc:   # a header that breaks the size check: this frame's NO_VERDICT
                    raw = UndecodableFrame(b"", f"{ref}: frame header unreadable: {type(exc).__name__}: {exc}")
                if c.rate is None:
                    mono, utc = time.monotonic(), time.time()
                else:
                    mono, utc = t0_mono + k / c.rate, t0_utc + k / c.rate
                    delay = mono - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                if self._stop.is_set():
                    return
                part = PartRecord(part_id=ids.next(), recipe=c.recipe, capture_time=utc, capture_monotonic=mono,
                                  encoder=self._encoder(k), raw=raw,
                                  image=image, source_ref=ref, cloud=cloud)
                if problem is not None:
                    part.decide(Verdict.NO_VERDICT, Reason.SCANNER_ERROR, f"part {part.part_id}: {problem}")
                yield part

    def _encoder(self, k: int) -> int | None:
        c = self.config
        if c.encoder_counts_per_part is None:
            return None
        return (c.encoder_start + k * c.encoder_counts_per_part) % c.encoder_rollover

    def _frames(self) -> Iterator[Frame]:
        rng = np.random.default_rng(self.config.seed)
        while True:
            if self._video is not None:
                if not (yield from _video_frames(self._video)):
                    raise SourceError(f"replay source video {str(self._video)!r} has no readable frames")
            else:
                order = rng.permutation(len(self._files)) if self.config.shuffle else range(len(self._files))
                for i in order:
                    yield _read_file(self._files[i])
            if not self.config.loop:
                return


def _read_scan(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(organised cloud, None), or (None, why it is unusable, naming the file)."""
    from ..pointcloud.io import CloudError, read_cloud

    try:
        return read_cloud(path), None
    except CloudError as exc:
        return None, str(exc)
    except Exception as exc:   # a reader fault on a hostile file: this part's NO_VERDICT, not the replay's end
        return None, f"{path}: cloud unreadable: {type(exc).__name__}: {exc}"


def _read_file(path: Path) -> Frame:
    try:
        return str(path), path.read_bytes(), None
    except OSError as exc:
        return str(path), UndecodableFrame(b"", f"cannot read {str(path)!r}: {exc.strerror or exc}"), None


def _video_frames(path: Path) -> Generator[Frame, None, int]:
    """One pass over a video as RGB frames; returns the number of frames read."""
    capture = cv2.VideoCapture(str(path))
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return index
            ref = f"{path}#frame={index}"
            yield ref, None, frame_to_rgb(frame, ref)
            index += 1
    finally:
        capture.release()
