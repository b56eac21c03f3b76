"""Reject archive: images and heat-map overlays of rejected parts, written off the hot path.

The hot path only calls :meth:`RejectArchive.submit`, which puts a reference to the part's arrays on a
bounded queue and returns at once; when the queue is full the item is dropped and counted. The archive
is the first thing shed under load, never the verdict. A worker thread encodes and writes the files,
and keeps the archive under its byte quota by deleting the oldest files first.

Layout: ``root/YYYY-MM-DD/{utc-time}_{part_id}_{VERDICT}_{reason}_{seq}.png`` plus ``..._overlay.jpg`` when
the part has an anomaly map (``.raw`` holds the received bytes of a frame that could not be decoded). Times
are the capture time in UTC, so names sort chronologically; ``seq`` (the ledger row) makes a name unique even
for two ids that sanitise alike in one millisecond (``LOT/7``, ``LOT 7``).

Disk: beside its quota the archive keeps ``min_free_fraction`` of its file system free: it deletes its own
oldest files to stay above it, and writes nothing (counted in ``refused_disk``, reported once through
``on_alarm``) when it has nothing left to delete. The ledger and the pools, not the pictures, get the room.
"""
from __future__ import annotations

import calendar
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .background import lower_this_thread
from .overlay import render_overlay
from .record import PartRecord, Reason, Verdict

log = logging.getLogger(__name__)

_FORMATS = {"png": (".png", []), "jpg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 92])}
# Overlays are pictures for people: JPEG encodes a 900 x 900 one in ~2 ms where PNG takes ~45 ms of the CPU the
# line shares. The part's own image keeps ``image_format`` (PNG: lossless evidence, re-seedable as it was seen).
_OVERLAY_EXTENSION = ".jpg"
_DATE_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NAME = re.compile(r"^(?P<time>\d{8}T\d{6}\.\d{3}Z)_(?P<part_id>.+)_(?P<verdict>ACCEPT|REJECT|NO-VERDICT)"
                   r"_(?P<reason>[a-z-]+)(?:_(?P<seq>\d+))?(?P<overlay>_overlay)?\.(?:png|jpg|raw)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class ArchivedName:
    """What an archive file name says about its part."""

    capture_time: float  # UTC epoch seconds, millisecond resolution
    part_id: str         # as written: characters unsafe in file names replaced by '-'
    verdict: Verdict
    reason: Reason
    overlay: bool
    seq: int | None = None   # the ledger row (None in names written before the seq was part of them)


def archive_stem(part_id: str, capture_time: float, verdict: Verdict, reason: Reason,
                 seq: int | None = None) -> tuple[str, str]:
    """(date folder, file stem) for a part, e.g. ``('2026-05-09', '20260509T073525.123Z_p17_REJECT_anomaly_42')``
    (``_42``: the ledger seq, when given; it keeps names unique per part)."""
    whole = int(capture_time)
    millis = min(int(round((capture_time - whole) * 1000)), 999)
    utc = time.gmtime(whole)
    stamp = time.strftime("%Y%m%dT%H%M%S", utc) + f".{millis:03d}Z"
    fields = (stamp, _UNSAFE.sub("-", part_id), verdict.value.replace("_", "-"), reason.label.replace("_", "-"))
    if seq is not None:
        fields += (str(int(seq)),)
    return time.strftime("%Y-%m-%d", utc), "_".join(fields)


def parse_archive_name(name: str) -> ArchivedName | None:
    """Read back a file name written by the archive; None for any other name."""
    match = _NAME.match(name)
    if match is None:
        return None
    try:
        reason = Reason[match["reason"].replace("-", "_").upper()]
    except KeyError:
        return None
    whole, millis = match["time"][:-1].split(".")
    return ArchivedName(capture_time=calendar.timegm(time.strptime(whole, "%Y%m%dT%H%M%S")) + int(millis) / 1000,
                        part_id=match["part_id"], verdict=Verdict(match["verdict"].replace("-", "_")),
                        reason=reason, overlay=match["overlay"] is not None,
                        seq=int(match["seq"]) if match["seq"] is not None else None)


@dataclass(frozen=True)
class ArchiveCounters:
    saved: int      # parts written
    dropped: int    # parts not archived because the queue was full
    failed: int     # parts whose files could not be written (or that had nothing to write)
    deleted: int    # files removed to stay under the quota or above the free-space floor
    bytes: int      # bytes of archive files on disk
    queued: int     # parts waiting for the worker
    refused_disk: int = 0   # parts not written: the disk was at its free-space floor with nothing left to delete


@dataclass(frozen=True)
class _Item:
    seq: int | None
    part_id: str
    capture_time: float
    verdict: Verdict
    reason: Reason
    image: np.ndarray | None
    anomaly_map: np.ndarray | None
    raw: bytes | None
    score: float | None
    threshold: float | None


class RejectArchive:
    """Asynchronous, quota-bounded archive of rejected parts (and optional samples of the others)."""

    def __init__(self, root: str | Path, quota_bytes: int, *, queue_size: int = 32, accepted_fraction: float = 0.0,
                 no_verdict_fraction: float = 0.0, image_format: str = "png",
                 overlay_range: tuple[float, float] | None = None, autostart: bool = True,
                 min_free_fraction: float = 0.1, on_alarm: Callable[[str], None] | None = None,
                 disk_usage: Callable[[Path], tuple[int, int]] | None = None) -> None:
        """``accepted_fraction`` / ``no_verdict_fraction``: share of ACCEPT / NO_VERDICT parts kept (evenly
        spaced: 0.1 keeps every tenth); REJECT parts are always kept. ``overlay_range``: fixed (vmin, vmax)
        of the heat-map colour scale so overlays compare across parts. ``autostart=False`` defers the
        worker to :meth:`start`. ``min_free_fraction``: share of the file system the archive leaves free
        (``disk_usage(root)`` gives (total, free) bytes; default ``shutil.disk_usage``); ``on_alarm`` hears
        once when it refuses a part for want of space.
        """
        if quota_bytes <= 0:
            raise ValueError(f"archive quota_bytes must be positive, got {quota_bytes}")
        if queue_size <= 0:
            raise ValueError(f"archive queue_size must be positive, got {queue_size}")
        if image_format not in _FORMATS:
            raise ValueError(f"archive image_format {image_format!r} is not one of {sorted(_FORMATS)}")
        for name, fraction in (("accepted_fraction", accepted_fraction), ("no_verdict_fraction", no_verdict_fraction),
                               ("min_free_fraction", min_free_fraction)):
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"archive {name} must be within [0, 1], got {fraction}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota_bytes = quota_bytes
        self.min_free_fraction = min_free_fraction
        self._on_alarm = on_alarm
        self._disk_usage = disk_usage or _disk_usage
        self._disk_alarmed = False
        self.overlay_range = overlay_range
        self._extension, self._encode_params = _FORMATS[image_format]
        self._fractions = {Verdict.REJECT: 1.0, Verdict.ACCEPT: accepted_fraction,
                           Verdict.NO_VERDICT: no_verdict_fraction}
        self._credit = dict.fromkeys(Verdict, 0.0)
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._files: deque[tuple[Path, int]] = deque()   # oldest first
        self._lock = threading.Lock()
        self._saved = self._dropped = self._failed = self._deleted = self._bytes = self._refused_disk = 0
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="reject-archive", daemon=True)
        if autostart:
            self.start()

    def start(self) -> None:
        """Start the writer thread (done by the constructor unless ``autostart=False``)."""
        if self._worker.ident is None and not self._closed:
            self._worker.start()

    def submit(self, part: PartRecord) -> bool:
        """Queue the part for archiving if its verdict is sampled; never blocks. True when queued.

        Only references are queued: do not modify the part's image, map or raw bytes in place afterwards.
        """
        if self._closed:
            raise RuntimeError(f"archive {self.root} is closed")
        if part.verdict is None or part.reason is None:
            raise ValueError(f"part {part.part_id!r}: verdict and reason must be set before archiving")
        credit = self._credit[part.verdict] + self._fractions[part.verdict]
        if credit < 1.0:
            self._credit[part.verdict] = credit
            return False
        self._credit[part.verdict] = credit - 1.0
        item = _Item(part.seq, part.part_id, part.capture_time, part.verdict, part.reason, part.image, part.anomaly_map,
                     part.raw, part.score, part.threshold)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self._dropped += 1
            return False
        return True

    def counters(self) -> ArchiveCounters:
        """A consistent snapshot of the archive's counters."""
        with self._lock:
            return ArchiveCounters(self._saved, self._dropped, self._failed, self._deleted, self._bytes,
                                   self._queue.qsize(), self._refused_disk)

    def close(self, timeout: float | None = None) -> None:
        """Write everything still queued, then stop the worker (waits at most ``timeout`` seconds)."""
        if self._closed:
            return
        self.start()
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("archive %s: worker did not drain its queue within %s s; closing without it",
                        self.root, timeout)
            return
        self._worker.join(timeout)

    def __enter__(self) -> "RejectArchive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- worker thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        lower_this_thread()
        try:
            self._scan()
        except OSError as exc:
            log.warning("archive %s: could not scan existing files: %s", self.root, exc)
        self._enforce_quota()
        while (item := self._queue.get()) is not None:
            try:
                written = self._write(item)
            except Exception:   # the archive must never stop the worker, whatever one part holds
                log.exception("archive %s: could not write part %s", self.root, item.part_id)
                written = False
            with self._lock:
                if written:
                    self._saved += 1
                else:
                    self._failed += 1
            self._enforce_quota()

    def _scan(self) -> None:
        """Inventory the files of earlier runs, oldest first; remove half-written leftovers."""
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and _DATE_FOLDER.match(p.name)):
            for path in folder.iterdir():
                if path.name.endswith(_PARTIAL_SUFFIX):
                    path.unlink(missing_ok=True)
                elif parse_archive_name(path.name) is not None:
                    found.append((folder.name, path.name, path, path.stat().st_size))
        found.sort()
        with self._lock:
            self._files.extend((path, size) for _, _, path, size in found)
            self._bytes += sum(size for *_, size in found)

    def _write(self, item: _Item) -> bool:
        """Encode and write the part's files; False when it has nothing to write."""
        date, stem = archive_stem(item.part_id, item.capture_time, item.verdict, item.reason, item.seq)
        files: list[tuple[str, bytes]] = []
        if item.image is not None:
            files.append((stem + self._extension, self._encode(item.image)))
            if item.anomaly_map is not None:
                lo, hi = self.overlay_range if self.overlay_range is not None else (None, None)
                overlay = render_overlay(item.image, item.anomaly_map, vmin=lo, vmax=hi, caption=_caption(item))
                files.append((stem + "_overlay" + _OVERLAY_EXTENSION, self._encode(overlay, _OVERLAY_EXTENSION)))
        elif item.raw is not None:
            files.append((stem + ".raw", item.raw))
        else:
            log.warning("archive %s: part %s has neither an image nor raw bytes", self.root, item.part_id)
            return False
        if not self._make_room(sum(len(data) for _, data in files)):
            with self._lock:
                self._refused_disk += 1
            self._alarm_once(f"archive {self.root}: the disk is at its free-space floor "
                             f"({self.min_free_fraction:.0%} kept free) and the archive has no file left to delete; "
                             f"part {item.part_id} and later ones are not archived until there is room")
            return False
        self._disk_alarmed = False
        folder = self.root / date
        folder.mkdir(exist_ok=True)
        for name, data in files:
            target = folder / name
            if target.exists():   # the same part archived again: the new file replaces the old one
                self._forget(target)
            partial = folder / (name + _PARTIAL_SUFFIX)
            partial.write_bytes(data)
            os.replace(partial, target)
            with self._lock:
                self._files.append((target, len(data)))
                self._bytes += len(data)
        return True

    def _encode(self, rgb: np.ndarray, extension: str | None = None) -> bytes:
        extension = extension or self._extension
        params = self._encode_params if extension == self._extension else _FORMATS[extension.lstrip(".")][1]
        ok, buffer = cv2.imencode(extension, np.ascontiguousarray(rgb[..., ::-1]), params)
        if not ok:
            raise ValueError(f"could not encode a {rgb.shape} {rgb.dtype} image as {extension}")
        return buffer.tobytes()

    def _make_room(self, needed: int) -> bool:
        """Delete the oldest archive files until ``needed`` more bytes leave ``min_free_fraction`` of the disk
        free; False when the archive's own files are gone and the disk is still too full."""
        while True:
            try:
                total, free = self._disk_usage(self.root)
            except OSError as exc:
                log.warning("archive %s: cannot read the free space (%s); writing nothing", self.root, exc)
                return False
            if free - needed >= self.min_free_fraction * total:
                return True
            if not self._delete_oldest():
                return False

    def _alarm_once(self, text: str) -> None:
        if not self._disk_alarmed:
            self._disk_alarmed = True
            log.warning("%s", text)
            if self._on_alarm is not None:
                self._on_alarm(text)

    def _forget(self, path: Path) -> None:
        with self._lock:
            for entry in [e for e in self._files if e[0] == path]:
                self._files.remove(entry)
                self._bytes -= entry[1]

    def _enforce_quota(self) -> None:
        """Delete the oldest files until the archive fits its quota; drop date folders left empty."""
        while True:
            with self._lock:
                if self._bytes <= self.quota_bytes:
                    return
            if not self._delete_oldest():
                return

    def _delete_oldest(self) -> bool:
        """Delete the archive's oldest file (and its date folder when left empty); False when there is none."""
        with self._lock:
            if not self._files:
                return False
            path, size = self._files.popleft()
            self._bytes -= size
            self._deleted += 1
            folder_done = not self._files or self._files[0][0].parent != path.parent
        try:
            path.unlink(missing_ok=True)
            if folder_done and next(path.parent.iterdir(), None) is None:
                path.parent.rmdir()
        except OSError as exc:
            log.warning("archive %s: could not delete %s: %s", self.root, path, exc)
        return True


def _disk_usage(path: Path) -> tuple[int, int]:
    usage = shutil.disk_usage(path)
    return usage.total, usage.free


def _caption(item: _Item) -> str:
    text = f"{item.part_id} {item.verdict.value} {item.reason.label}"
    if item.score is not None and item.threshold is not None:
        text += f" {item.score:.3f}/{item.threshold:.3f}"
    return text
