"""What the view reads: bounded queries on the ledger (read-only), archive files, the control socket.

Every ledger query is an index range: the rowid (``seq``) range of the last N parts, or the ``created``
index for the start of the shift; the per-shift figures are kept incrementally, so a refresh only reads
the rows written since the previous one. Use one :class:`LineData` from one thread (SQLite connections
are per thread); the web app runs all of its calls on a single worker thread.
"""
from __future__ import annotations

import math
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from ..archive import archive_stem
from ..mediaio import MediaError, read_image
from ..ledger import STAGES, Ledger, LedgerError, LedgerReader, LedgerRow
from ..runtime.control import ControlError, request
from .figures import score_histogram, shift_start

IMAGE_KINDS = ("overlay", "image")
THUMB_SIDE = 192      # px, longest side of a dashboard thumbnail
THUMB_CACHE = 128     # thumbnails kept in memory (the dashboard shows the newest few)
_EXTENSIONS = (".png", ".jpg")
FLAGGED_SCAN = 5000      # rejects / NO_VERDICT parts are looked for among the last this many parts
RATE_BUCKET_S = 900.0    # the shift's reject-rate chart has one bar per 15 minutes


@dataclass(frozen=True)
class ViewOptions:
    """What the view shows; mirrors ``view:`` of the line config (musc_edge.edge.config.ViewSettings)."""

    line_name: str
    storage: Path
    control_socket: Path
    recent: int = 12
    histogram_parts: int = 500
    shifts: tuple[str, ...] = ("06:00", "14:00", "22:00")
    control_timeout_s: float = 1.0


MAX_ROW_ID = 2**63 - 1   # SQLite's largest integer (the ledger's seq is its rowid)


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: such a value is shown as missing."""
    return value if value is None or math.isfinite(value) else None


def archive_files(archive_root: Path, row: LedgerRow) -> dict[str, Path]:
    """The archived files of a ledger row that exist: {'image': path, 'overlay': path} (either may be absent).

    The paths are derived from the row (the archive's own naming), never from anything a client sent.
    """
    found = {}
    for seq in (row.seq, None):   # names carry the seq; archives written before that do not
        date, stem = archive_stem(row.part_id, row.capture_time, row.verdict, row.reason, seq)
        for kind, suffix in (("image", ""), ("overlay", "_overlay")):
            for extension in _EXTENSIONS:
                path = archive_root / date / f"{stem}{suffix}{extension}"
                if kind not in found and path.is_file():
                    found[kind] = path
                    break
        if found:
            return found
    return found


def make_thumbnail(path: Path, side: int = THUMB_SIDE) -> bytes | None:
    """``path``'s picture as a JPEG at most ``side`` px on its longest side; None if it cannot be read."""
    try:   # the one image reader (edge_app/mediaio.py): header checked against the pixel budget first
        image = read_image(path)[..., ::-1]
    except MediaError:
        return None
    scale = side / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return data.tobytes() if ok else None


def control_status(socket: Path, timeout: float) -> dict:
    """The running line's read-only ``status`` reply, or {'running': False, 'error': why}."""
    try:
        reply = request(socket, {"cmd": "status"}, timeout=timeout)
    except (ControlError, OSError, ValueError) as exc:
        return {"running": False, "error": str(exc)}
    if not reply.get("ok"):
        return {"running": False, "error": reply.get("error", "the line refused the status request")}
    return {"running": True, **reply}


class _ShiftBuckets:
    """Parts, rejects and NO_VERDICT parts per time bucket since the shift start, updated incrementally."""

    def __init__(self, bucket_s: float) -> None:
        self.bucket_s = bucket_s
        self.start: float | None = None
        self.last_seq = 0
        self.counts: dict[int, list[int]] = {}

    def update(self, conn: sqlite3.Connection, start: float) -> None:
        if start != self.start:
            first = conn.execute("SELECT MIN(seq) FROM parts WHERE created >= ?", (start,)).fetchone()[0]
            top = conn.execute("SELECT IFNULL(MAX(seq), 0) FROM parts").fetchone()[0]
            self.start, self.counts = start, {}
            self.last_seq = (first - 1) if first is not None else top
        rows = conn.execute(
            "SELECT CAST((created - ?) / ? AS INTEGER), COUNT(*), SUM(verdict = 'REJECT'), "
            "SUM(verdict = 'NO_VERDICT'), MAX(seq) FROM parts WHERE seq > ? AND created >= ? GROUP BY 1",
            (start, self.bucket_s, self.last_seq, start)).fetchall()
        for bucket, parts, rejected, no_verdict, top in rows:
            counts = self.counts.setdefault(bucket, [0, 0, 0])
            counts[0] += parts
            counts[1] += rejected
            counts[2] += no_verdict
            self.last_seq = max(self.last_seq, top)

    def series(self, now: float) -> list[dict]:
        if self.start is None:
            return []
        n = int((now - self.start) // self.bucket_s) + 1
        return [{"start": self.start + k * self.bucket_s, "parts": c[0], "ng": c[1], "no_verdict": c[2]}
                for k in range(n) for c in [self.counts.get(k, (0, 0, 0))]]


class LineData:
    """The view's read-only access to one line's ledger, archive and live state."""

    def __init__(self, options: ViewOptions) -> None:
        self.options = options
        self.ledger_path = options.storage / "ledger.sqlite"
        self.archive_root = options.storage / "archive"
        self._reader: LedgerReader | None = None
        self._conn: sqlite3.Connection | None = None
        self.ledger_error: str | None = None
        self._buckets = _ShiftBuckets(RATE_BUCKET_S)
        self._thumbs: OrderedDict[Path, bytes] = OrderedDict()

    # -- ledger ---------------------------------------------------------------------------------------------
    def _open(self) -> bool:
        """Open the ledger read-only once it exists (the view may start before the line's first part)."""
        if self._reader is not None:
            return True
        if not self.ledger_path.is_file():
            self.ledger_error = f"no ledger at {self.ledger_path} yet: has this line run?"
            return False
        try:
            self._reader = Ledger.open_readonly(self.ledger_path)   # checks the schema version
        except LedgerError as exc:   # e.g. the runtime is creating or migrating it right now
            self.ledger_error = str(exc)
            return False
        self.ledger_error = None
        self._conn = sqlite3.connect(f"{self.ledger_path.resolve().as_uri()}?mode=ro", uri=True,
                                     isolation_level=None)
        self._conn.execute("PRAGMA busy_timeout = 2000")
        return True

    def _top_seq(self) -> int:
        return self._conn.execute("SELECT IFNULL(MAX(seq), 0) FROM parts").fetchone()[0]

    def row(self, seq: int) -> LedgerRow | None:
        """One ledger row by sequence number (None if absent, outside SQLite's 64-bit row ids, or no ledger yet)."""
        if not 0 < seq <= MAX_ROW_ID:   # a URL can ask for any integer; SQLite cannot bind one over 2**63 - 1
            return None
        return self._reader.get(seq) if self._open() else None

    def image_path(self, seq: int, kind: str) -> Path | None:
        """The archived ``kind`` ('image' or 'overlay') file of part ``seq``, if it exists."""
        if kind not in IMAGE_KINDS:
            return None
        row = self.row(seq)
        if row is None:
            return None
        path = archive_files(self.archive_root, row).get(kind)
        if path is None or not path.resolve().is_relative_to(self.archive_root.resolve()):
            return None
        return path

    def thumbnail(self, seq: int) -> bytes | None:
        """A small JPEG of part ``seq``'s overlay (else its image), made once and kept in a small cache: the
        dashboard's browser then never decodes and scales full-size frames on every refresh."""
        path = self.image_path(seq, "overlay") or self.image_path(seq, "image")
        if path is None:
            return None
        if path in self._thumbs:
            self._thumbs.move_to_end(path)
            return self._thumbs[path]
        thumb = make_thumbnail(path)
        if thumb is not None:
            self._thumbs[path] = thumb
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return thumb

    def flagged(self, n: int) -> list[dict]:
        """The ``n`` newest REJECT and NO_VERDICT parts among the last FLAGGED_SCAN parts, newest first."""
        rows = self._conn.execute(
            "SELECT seq FROM parts WHERE seq > ? AND verdict != 'ACCEPT' ORDER BY seq DESC LIMIT ?",
            (self._top_seq() - FLAGGED_SCAN, n)).fetchall()
        return [self.describe(self._reader.get(seq)) for (seq,) in rows]

    def describe(self, row: LedgerRow) -> dict:
        """A ledger row as the page shows it, with the URLs of its archived images."""
        files = archive_files(self.archive_root, row)
        return {
            "seq": row.seq, "part_id": row.part_id, "recipe": row.recipe,
            "captured": datetime.fromtimestamp(row.capture_time).astimezone().isoformat(timespec="seconds"),
            "verdict": row.verdict.value, "reason": row.reason.label, "signalled": row.signalled.value,
            "score": _finite(row.score), "raw_score": _finite(row.raw_score), "threshold": _finite(row.threshold),
            "detail": row.detail,
            "calibration_version": row.calibration_version, "model_hash": row.model_hash,
            "config_hash": row.config_hash, "test_part": row.test_part, "dry_run": row.dry_run,
            "acked": row.acked, "ack_late": row.ack_late, "source_ref": row.source_ref,
            "latency_ms": {stage: _finite(None if seconds is None else 1e3 * seconds)
                           for stage in STAGES for seconds in [getattr(row, f"{stage}_s")]},
            "images": {**{kind: f"/archive/{row.seq}/{kind}" for kind in IMAGE_KINDS if kind in files},
                       **({"thumb": f"/archive/{row.seq}/thumb"} if files else {})},
        }

    def histograms(self, n: int, thresholds: dict[str, float]) -> dict[str, dict]:
        """Per recipe: the score histogram of the scored parts among the last ``n`` parts.

        ``thresholds``: the recipes' thresholds in force (live); else each recipe's newest row's.
        """
        rows = self._conn.execute(
            "SELECT recipe, score, verdict = 'REJECT', threshold FROM parts "
            "WHERE seq > ? AND score IS NOT NULL ORDER BY seq", (self._top_seq() - n,)).fetchall()
        by_recipe: dict[str, list[tuple]] = {}
        for recipe, *values in rows:
            by_recipe.setdefault(recipe, []).append(values)
        out = {}
        for recipe, values in sorted(by_recipe.items()):
            scores, rejected, row_thresholds = (np.array(column, dtype=float) for column in zip(*values))
            threshold = _finite(thresholds.get(recipe, float(row_thresholds[-1])))
            finite = np.isfinite(scores)
            out[recipe] = score_histogram(scores[finite], rejected[finite].astype(bool), threshold)
        return out

    # -- the whole page -------------------------------------------------------------------------------------
    def snapshot(self, now: float | None = None) -> dict:
        """Everything the live page shows, as JSON-ready data."""
        now = time.time() if now is None else now
        start = shift_start(datetime.fromtimestamp(now).astimezone(), self.options.shifts).timestamp()
        live = control_status(self.options.control_socket, self.options.control_timeout_s)
        page = {"line": live.get("line", self.options.line_name), "now": now, "shift_start": start,
                "live": _live_health(live), "ledger": self._open()}
        if not page["ledger"]:
            page["ledger_error"] = self.ledger_error
            return page
        counters = self._reader.counters(since=start)
        parts = counters["parts"]
        page["counters"] = {key: counters[key] for key in ("parts", "ok", "ng", "no_verdict", "no_verdict_by_reason",
                                                           "passed_flagged", "test_parts", "unacked", "ack_late")}
        page["counters"]["reject_rate"] = counters["ng"] / parts if parts else None
        page["counters"]["no_verdict_rate"] = counters["no_verdict"] / parts if parts else None
        page["latency_ms"] = {stage: {key: None if stats[key] is None else 1e3 * stats[key]
                                      for key in ("median", "p99", "max")} | {"n": stats["n"]}
                              for stage, stats in counters["latency"].items()}
        self._buckets.update(self._conn, start)
        page["rate"] = {"bucket_s": RATE_BUCKET_S, "buckets": self._buckets.series(now)}
        page["flagged"] = self.flagged(self.options.recent)
        thresholds = {name: pool["threshold"] for name, pool in page["live"].get("pools", {}).items()
                      if pool.get("threshold") is not None}
        page["histograms"] = self.histograms(self.options.histogram_parts, thresholds)
        return page

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._conn.close()
            self._reader = self._conn = None


def _live_health(status: dict) -> dict:
    """Link, pool and alarm health from a control ``status`` reply (pool member scores left out)."""
    if not status.get("running"):
        return {"running": False, "error": status.get("error")}
    pools = {name: {"threshold": recipe.get("threshold"),
                    **{k: v for k, v in recipe.get("pool", {}).items() if k != "raw_scores"}}
             for name, recipe in status.get("recipes", {}).items()}
    stats = status.get("stats", {})
    return {"running": True, "calibration_version": status.get("calibration_version"),
            "dry_run": status.get("dry_run"), "queue_depth": status.get("queue_depth"),
            "link": status.get("link"), "pools": pools, "alarms": stats.get("alarms", []),
            "parts_since_start": stats.get("parts")}

