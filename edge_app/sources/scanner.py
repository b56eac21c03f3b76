"""3D scanners: organised point clouds by part id, and the buffer that pairs them with image parts.

A cloud is ``[H, W, 3]`` float32 in sensor coordinates, pixel-aligned with the RGB frame, NaN = missing
point (clouds that mark missing points with 0, such as MVTec 3D-AD, are converted at ingest).

>>> buffer = PairingBuffer(timeout_s=0.5)
>>> ready = buffer.add_part(record) + buffer.add_cloud(part_id, cloud) + buffer.expire()
"""
from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..record import PartRecord, Reason, Verdict
from .base import Device, PartIds, SourceConfigError, glob_files

logger = logging.getLogger(__name__)

CLOUD_SUFFIXES = (".npy", ".tiff", ".tif", ".ply", ".pcd")   # what edge_app/pointcloud/io.py reads


def normalize_cloud(cloud: np.ndarray, zero_is_missing: bool = False) -> np.ndarray:
    """A float32 copy of an ``[H, W, 3]`` cloud, with all-zero points set to NaN when ``zero_is_missing``."""
    out = cloud.astype(np.float32)
    if zero_is_missing:
        out[~out.any(axis=2)] = np.nan
    return out


def cloud_problem(cloud: np.ndarray | None) -> str | None:
    """Why ``cloud`` cannot be scored (None: it can): missing, not ``[H, W, 3]`` float32, or no valid point."""
    if cloud is None:
        return "the scanner delivered no cloud"
    if not isinstance(cloud, np.ndarray) or cloud.ndim != 3 or cloud.shape[2] != 3:
        return f"cloud of shape {getattr(cloud, 'shape', None)} is not [H, W, 3]"
    if cloud.dtype != np.float32:
        return f"cloud dtype {cloud.dtype} is not float32"
    if cloud.size == 0 or not np.isfinite(cloud[..., 2]).any():
        return f"cloud of shape {cloud.shape} has no valid point"
    return None


class ScannerSource(Device):
    """A 3D scanner as a stream of ``(part_id, cloud)``; same lifecycle as a ``FrameSource``.

    ``clouds()`` is a blocking generator drained by one thread; it yields each scan as it completes,
    ``cloud`` being ``[H, W, 3]`` float32 with NaN = missing, or None for a failed scan (never skipped, so
    the part is not left waiting for its pairing timeout). It ends when the scanner is exhausted or soon
    after ``close()``.
    """

    def clouds(self) -> Iterator[tuple[str, np.ndarray | None]]:
        """Scans as they complete (see the class docstring)."""
        return self._guarded(self._iterate())

    @abstractmethod
    def _iterate(self) -> Iterator[tuple[str, np.ndarray | None]]: ...


class FolderScanner(ScannerSource):
    """Replays clouds (``.npy``, MVTec-style ``.tiff``, ``.ply``, ``.pcd``) from a folder or a list, read by
    edge_app/pointcloud/io.py: ``[H, W, 3]`` float32, and ``(0, 0, 0)`` and non-finite points are missing
    (NaN) whatever ``zero_is_missing`` says (kept for callers that still pass it).

    Part ids come from ``part_ids`` in file order, so a replayed image source with the same id settings and
    the parallel file list (``rgb/000.png`` ... beside ``xyz/000.tiff`` ...) pairs part for part.
    """

    def __init__(self, folder: str | Path | None = None, *, paths: Sequence[str | Path] | None = None,
                 pattern: str = "*", recursive: bool = False, zero_is_missing: bool = False,
                 part_ids: PartIds | None = None) -> None:
        super().__init__()
        if (folder is None) == (paths is None):
            raise SourceConfigError(f"FolderScanner needs exactly one of folder and paths, got folder={folder!r}, "
                                    f"paths={paths!r}")
        self._folder, self._paths, self._pattern, self._recursive = folder, paths, pattern, recursive
        self._zero_is_missing = zero_is_missing
        self._part_ids = part_ids or PartIds()
        self._files: list[Path] = []

    def _acquire(self) -> None:
        if self._paths is None:
            self._files = glob_files(self._folder, self._pattern, self._recursive, CLOUD_SUFFIXES)
            return
        self._files = [Path(p) for p in self._paths]
        missing = [str(p) for p in self._files if not p.is_file()]
        if missing:
            raise SourceConfigError(f"FolderScanner paths: {len(missing)} file(s) not found, first {missing[0]!r}")

    def _iterate(self) -> Iterator[tuple[str, np.ndarray | None]]:
        for path in self._files:
            if self._stop.is_set():
                return
            yield self._part_ids.next(), self._load(path)

    def _load(self, path: Path) -> np.ndarray | None:
        from ..pointcloud.io import CloudError, read_cloud   # the one cloud reader (formats, NaN = missing)

        try:
            return read_cloud(path)
        except CloudError as exc:
            logger.warning("FolderScanner cannot use %s: %s", path, exc)
            return None   # the part gets its NO_VERDICT (scanner_error) through cloud_problem


class PairingBuffer:
    """Pairs image parts with scanner clouds by part id; bounded, thread-safe.

    Every method returns the parts that became ready, each exactly once: paired (``cloud`` set), or
    decided NO_VERDICT / SCANNER_ERROR with ``cloud`` None and the reason in ``detail`` when the cloud is
    missing after ``timeout_s``, unusable (:func:`cloud_problem`), or pushed out because ``capacity``
    parts are already waiting. The runtime must call :meth:`expire` regularly (e.g. on every loop) and
    must not score a part that already has a verdict. A part that already carries a cloud passes through.
    """

    def __init__(self, timeout_s: float = 0.5, capacity: int = 64,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not timeout_s > 0 or not capacity >= 1:
            raise ValueError(f"PairingBuffer needs timeout_s > 0 and capacity >= 1, got {timeout_s}, {capacity}")
        self.timeout_s, self.capacity, self._clock = timeout_s, capacity, clock
        self._parts: OrderedDict[str, tuple[float, PartRecord]] = OrderedDict()
        self._clouds: OrderedDict[str, tuple[float, np.ndarray | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.missing_clouds = 0   # parts sent on without a usable cloud
        self.orphan_clouds = 0    # clouds dropped without their part

    @property
    def waiting(self) -> tuple[int, int]:
        """(parts waiting for a cloud, clouds waiting for a part)."""
        return len(self._parts), len(self._clouds)

    def add_part(self, record: PartRecord) -> list[PartRecord]:
        """Offer an image part; returns it at once if its cloud is here (or it has one), else holds it."""
        with self._lock:
            if record.cloud is not None:
                return [record]
            if record.part_id in self._clouds:
                return [self._attach(record, self._clouds.pop(record.part_id)[1])]
            ready = []
            if record.part_id in self._parts:
                ready.append(self._fail(self._parts.pop(record.part_id)[1], "a second part arrived with its id"))
            self._parts[record.part_id] = (self._clock(), record)
            while len(self._parts) > self.capacity:
                old = self._parts.popitem(last=False)[1][1]
                ready.append(self._fail(old, f"pairing buffer full ({self.capacity} parts waiting for clouds)"))
            return ready

    def add_cloud(self, part_id: str, cloud: np.ndarray | None) -> list[PartRecord]:
        """Offer a scan (None = failed scan); returns its part if that is waiting, else holds the cloud."""
        with self._lock:
            if part_id in self._parts:
                return [self._attach(self._parts.pop(part_id)[1], cloud)]
            if self._clouds.pop(part_id, None) is not None:
                self.orphan_clouds += 1
            self._clouds[part_id] = (self._clock(), cloud)
            while len(self._clouds) > self.capacity:
                self._clouds.popitem(last=False)
                self.orphan_clouds += 1
            return []

    def expire(self) -> list[PartRecord]:
        """Parts whose cloud did not come within ``timeout_s``; also drops clouds that waited as long."""
        with self._lock:
            limit = self._clock() - self.timeout_s
            ready = []
            while self._parts and next(iter(self._parts.values()))[0] <= limit:
                ready.append(self._fail(self._parts.popitem(last=False)[1][1],
                                        f"no cloud arrived within {self.timeout_s:g} s"))
            while self._clouds and next(iter(self._clouds.values()))[0] <= limit:
                self._clouds.popitem(last=False)
                self.orphan_clouds += 1
            return ready

    def flush(self) -> list[PartRecord]:
        """Every waiting part, as missing its cloud (at shutdown); waiting clouds are dropped."""
        with self._lock:
            ready = [self._fail(record, "the scanner stopped before its cloud arrived")
                     for _, record in self._parts.values()]
            self._parts.clear()
            self.orphan_clouds += len(self._clouds)
            self._clouds.clear()
            return ready

    def _attach(self, record: PartRecord, cloud: np.ndarray | None) -> PartRecord:
        problem = cloud_problem(cloud)
        if problem is not None:
            return self._fail(record, problem)
        record.cloud = cloud
        return record

    def _fail(self, record: PartRecord, why: str) -> PartRecord:
        self.missing_clouds += 1
        record.cloud = None
        return record.decide(Verdict.NO_VERDICT, Reason.SCANNER_ERROR, f"part {record.part_id}: {why}")
