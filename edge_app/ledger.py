"""The results ledger: one durable SQLite row per part, whose row id is the wire sequence number.

A verdict row is committed with ``synchronous=FULL`` in WAL mode *before* the runtime reports the
signal as sent, so every signalled verdict survives a SIGKILL or a power cut. Rows are append-only:
only the ack and link-time fields are ever updated (SQLite triggers refuse anything else, and deletes).
The writer (:class:`Ledger`) lives in the runtime; the technician's status command reads the same
file from another process through :meth:`Ledger.open_readonly` while the runtime keeps writing.
"""
from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .record import PartRecord, Reason, Verdict

STAGES = ("decode", "features", "scoring", "link", "total")
_VERDICT_CODE = {verdict: code for code, verdict in enumerate(Verdict)}
_ACCEPT, _NO_VERDICT = _VERDICT_CODE[Verdict.ACCEPT], _VERDICT_CODE[Verdict.NO_VERDICT]


class LedgerError(RuntimeError):
    """The ledger file is unusable, from a newer build, or asked to do something it must not."""


def _create_v1(conn: sqlite3.Connection) -> None:
    """Schema 1. Written out literally: a migration must not change when the code around it does."""
    conn.execute("""
        CREATE TABLE parts (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            part_id TEXT NOT NULL,
            recipe TEXT NOT NULL,
            capture_time REAL NOT NULL,
            encoder INTEGER,
            source_ref TEXT,
            verdict TEXT NOT NULL CHECK (verdict IN ('ACCEPT', 'REJECT', 'NO_VERDICT')),
            reason INTEGER NOT NULL,
            reason_label TEXT NOT NULL,
            signalled TEXT NOT NULL CHECK (signalled IN ('ACCEPT', 'REJECT', 'NO_VERDICT')),
            raw_score REAL,
            score REAL,
            threshold REAL,
            detail TEXT NOT NULL,
            decode_s REAL,
            features_s REAL,
            scoring_s REAL,
            link_s REAL,
            total_s REAL,
            model_hash TEXT NOT NULL,
            config_hash TEXT NOT NULL,
            calibration_version TEXT NOT NULL,
            test_part INTEGER NOT NULL,
            created REAL NOT NULL,
            acked INTEGER NOT NULL DEFAULT 0,
            acked_time REAL,
            ack_late INTEGER NOT NULL DEFAULT 0,
            changed INTEGER NOT NULL
        )""")
    conn.execute("CREATE INDEX parts_part_id ON parts (part_id)")
    conn.execute("CREATE INDEX parts_created ON parts (created, seq)")
    conn.execute("CREATE INDEX parts_unacked ON parts (seq) WHERE acked = 0")
    conn.execute("CREATE UNIQUE INDEX parts_changed ON parts (changed)")
    conn.execute("""
        CREATE TRIGGER parts_append_only BEFORE UPDATE OF
            seq, part_id, recipe, capture_time, encoder, source_ref, verdict, reason, reason_label, signalled,
            raw_score, score, threshold, detail, decode_s, features_s, scoring_s, model_hash, config_hash,
            calibration_version, test_part, created ON parts
        BEGIN SELECT RAISE(ABORT, 'ledger rows are append-only: only ack and link fields may change'); END""")
    conn.execute("""
        CREATE TRIGGER parts_no_delete BEFORE DELETE ON parts
        BEGIN SELECT RAISE(ABORT, 'ledger rows are never deleted'); END""")


def _add_dry_run_v2(conn: sqlite3.Connection) -> None:
    """v2: ``dry_run`` marks rows decided while the line logged verdicts without signalling them."""
    conn.execute("ALTER TABLE parts ADD COLUMN dry_run INTEGER NOT NULL DEFAULT 0")
    conn.execute("DROP TRIGGER parts_append_only")
    conn.execute("""
        CREATE TRIGGER parts_append_only BEFORE UPDATE OF
            seq, part_id, recipe, capture_time, encoder, source_ref, verdict, reason, reason_label, signalled,
            raw_score, score, threshold, detail, decode_s, features_s, scoring_s, model_hash, config_hash,
            calibration_version, test_part, created, dry_run ON parts
        BEGIN SELECT RAISE(ABORT, 'ledger rows are append-only: only ack and link fields may change'); END""")


def _add_unsendable_v3(conn: sqlite3.Connection) -> None:
    """v3: ``unsendable`` says why a row's signal can never go out (it is then not re-sent at start)."""
    conn.execute("ALTER TABLE parts ADD COLUMN unsendable TEXT")


def _add_line_epoch_v4(conn: sqlite3.Connection) -> None:
    """v4: ``line_identity.epoch``, a random non-zero 32-bit id of this ledger that every PLC message carries
    (docs/wire-protocol.md): a fresh storage is a new epoch, so the PLC never mistakes its seqs for old ones."""
    conn.execute("CREATE TABLE line_identity (epoch INTEGER NOT NULL CHECK (epoch BETWEEN 1 AND 4294967295))")
    conn.execute("INSERT INTO line_identity (epoch) VALUES (?)", (secrets.randbelow(0xFFFFFFFF) + 1,))
    conn.execute("""CREATE TRIGGER line_identity_fixed BEFORE UPDATE ON line_identity
                    BEGIN SELECT RAISE(ABORT, 'the line epoch never changes'); END""")


# MIGRATIONS[i] takes a database from schema version i to i + 1 (version 0 = empty file).
Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: tuple[Migration, ...] = (_create_v1, _add_dry_run_v2, _add_unsendable_v3, _add_line_epoch_v4)
SCHEMA_VERSION = len(MIGRATIONS)


def apply_migrations(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS,
                     name: str = "ledger") -> int:
    """Bring the database to ``len(migrations)``, one transaction per step; returns the final version.

    ``conn`` must be in autocommit mode (``isolation_level=None``). A database whose version is newer
    than this build knows is refused rather than guessed at.
    """
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise LedgerError(f"{name}: schema version {version} is newer than this build's "
                          f"{len(migrations)}; upgrade musc-edge to open it")
    for step in range(version, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrations[step](conn)
            conn.execute(f"PRAGMA user_version = {step + 1}")
        except BaseException as exc:
            conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError):
                raise LedgerError(f"{name}: migration to schema version {step + 1} failed: {exc}") from exc
            raise
        conn.execute("COMMIT")
    return len(migrations)


@dataclass(frozen=True)
class LedgerRow:
    """One part as persisted."""

    seq: int
    part_id: str
    recipe: str
    capture_time: float
    encoder: int | None
    source_ref: str | None
    verdict: Verdict
    reason: Reason
    reason_label: str
    signalled: Verdict
    raw_score: float | None
    score: float | None
    threshold: float | None
    detail: str
    decode_s: float | None
    features_s: float | None
    scoring_s: float | None
    link_s: float | None     # None until the signal has been delivered
    total_s: float | None
    model_hash: str
    config_hash: str
    calibration_version: str
    test_part: bool
    created: float           # UTC epoch seconds when the row was committed
    acked: bool
    acked_time: float | None
    ack_late: bool
    dry_run: bool            # decided in dry-run mode: recorded, never signalled
    unsendable: str | None = None   # why the signal can never go out (alarmed; never re-sent)


_ROW_COLUMNS = ", ".join(LedgerRow.__dataclass_fields__)


def _to_row(values: tuple) -> LedgerRow:
    row = dict(zip(LedgerRow.__dataclass_fields__, values))
    row.update(verdict=Verdict(row["verdict"]), reason=Reason(row["reason"]), signalled=Verdict(row["signalled"]),
               test_part=bool(row["test_part"]), acked=bool(row["acked"]), ack_late=bool(row["ack_late"]),
               dry_run=bool(row["dry_run"]))
    return LedgerRow(**row)


def _verdict_code_sql(column: str) -> str:
    """SQL mapping a verdict column to its small-integer code."""
    return f"CASE {column} " + " ".join(f"WHEN '{v.value}' THEN {code}" for v, code in _VERDICT_CODE.items()) + " END"


class _CounterCache:
    """Numeric columns of the rows with ``seq >= base``, mirrored column-major in numpy.

    Refreshed incrementally: every insert or update stamps the row with a ledger-wide increasing
    ``changed`` number, so a refresh only fetches rows changed since the last one (an index range).
    """

    _SELECT = (f"SELECT seq, changed, created, {_verdict_code_sql('verdict')}, {_verdict_code_sql('signalled')}, "
               f"reason, acked, ack_late, test_part, {', '.join(f'{stage}_s' for stage in STAGES)} "
               "FROM parts INDEXED BY parts_changed WHERE changed > ? AND seq >= ?")
    _VERDICT, _SIGNALLED, _REASON, _ACKED, _LATE, _TEST = range(6)   # rows of `codes`
    _QUANTILES = np.array([0.5, 0.99])

    def __init__(self) -> None:
        self.synced = False
        self.since: float | None = None   # the window holds the rows from the first one created at/after this
        self._reset(base=1)

    def _reset(self, base: int, capacity: int = 1024) -> None:
        self.base = base       # seq held in slot 0
        self.used = 0          # slots in use: highest seq seen - base + 1
        self.watermark = 0     # highest `changed` stamp seen in the window
        self.present = np.zeros(capacity, bool)
        self.created = np.zeros(capacity)
        self.codes = np.zeros((6, capacity), np.int8)
        self.latency = np.full((len(STAGES), capacity), np.nan)
        self._scratch = np.empty(capacity)             # reused by the percentile partitions
        self._missing = np.empty(capacity, bool)

    def _rebase(self, base: int, capacity: int) -> None:
        """Keep the slots from seq ``base >= self.base`` on, in arrays of ``capacity`` slots."""
        drop = min(base - self.base, self.used)
        kept = (self.present[drop:self.used], self.created[drop:self.used],
                self.codes[:, drop:self.used], self.latency[:, drop:self.used])
        watermark = self.watermark   # still valid: every row of the smaller window was seen up to it
        self._reset(base, capacity)
        for new, old in zip((self.present, self.created, self.codes, self.latency), kept):
            new[..., :old.shape[-1]] = old
        self.used, self.watermark = len(kept[0]), watermark

    def sync(self, conn: sqlite3.Connection, since: float | None) -> None:
        """Start the window at the first row created at or after ``since``, then pull what changed."""
        if not self.synced or since != self.since:
            base = 1 if since is None else conn.execute(
                "SELECT IFNULL(MIN(seq), (SELECT IFNULL(MAX(seq), 0) + 1 FROM parts)) FROM parts "
                "WHERE created >= ?", (since,)).fetchone()[0]
            if self.synced and base >= self.base:
                self._rebase(base, len(self.present))
            else:
                self._reset(base)   # rows below the old base were never fetched
            self.synced, self.since = True, since
        rows = conn.execute(self._SELECT, (self.watermark, self.base)).fetchall()
        if not rows:
            return
        block = np.array(rows, dtype=np.float64)
        slots = block[:, 0].astype(np.int64) - self.base
        top = int(slots.max()) + 1
        if top > len(self.present):
            self._rebase(self.base, max(top, 2 * len(self.present)))
        self.present[slots] = True
        self.created[slots] = block[:, 2]
        self.codes[:, slots] = block[:, 3:9].T
        self.latency[:, slots] = block[:, 9:].T
        self.used = max(self.used, top)
        self.watermark = max(self.watermark, int(block[:, 1].max()))

    def counters(self, since: float | None) -> dict:
        n = self.used
        inside = self.present[:n] if since is None else self.present[:n] & (self.created[:n] >= since)
        whole = bool(inside.all())   # the usual case: plain views, no gathering
        codes = self.codes[:, :n] if whole else self.codes[:, :n][:, inside]
        latency = self.latency[:, :n] if whole else self.latency[:, :n][:, inside]
        parts = codes.shape[1]
        verdict = codes[self._VERDICT]
        per_verdict = np.bincount(verdict, minlength=len(Verdict))
        no_verdict = verdict == _NO_VERDICT
        per_reason = np.bincount(codes[self._REASON][no_verdict], minlength=len(Reason))
        acked = int(np.count_nonzero(codes[self._ACKED]))
        return {
            "parts": parts,
            "ok": int(per_verdict[_VERDICT_CODE[Verdict.ACCEPT]]),
            "ng": int(per_verdict[_VERDICT_CODE[Verdict.REJECT]]),
            "no_verdict": int(per_verdict[_NO_VERDICT]),
            "no_verdict_by_reason": {r.label: int(per_reason[r]) for r in Reason if per_reason[r]},
            "passed_flagged": int(np.count_nonzero(no_verdict & (codes[self._SIGNALLED] == _ACCEPT))),
            "test_parts": int(np.count_nonzero(codes[self._TEST])),
            "acked": acked,
            "unacked": parts - acked,
            "ack_late": int(np.count_nonzero(codes[self._LATE])),
            "latency": {stage: self._latency_stats(column) for stage, column in zip(STAGES, latency)},
        }

    def _latency_stats(self, seconds: np.ndarray) -> dict:
        """n / min / median / p99 / max of the known (non-NaN) values, as ``np.quantile``'s linear method."""
        known = len(seconds) - int(np.count_nonzero(np.isnan(seconds, out=self._missing[:len(seconds)])))
        if known == 0:
            return {"n": 0, "min": None, "median": None, "p99": None, "max": None}
        position = (known - 1) * self._QUANTILES
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, known - 1)
        ordered = self._scratch[:len(seconds)]
        np.copyto(ordered, seconds)
        ordered.partition(np.unique(np.concatenate(([0, known - 1], below, above))))   # NaNs sort last
        low, high = ordered[below], ordered[above]
        median, p99 = low + (position - below) * (high - low)
        return {"n": known, "min": float(ordered[0]), "median": float(median), "p99": float(p99),
                "max": float(ordered[known - 1])}


class LedgerReader:
    """Read access to a ledger; safe to use from another process while the runtime writes (WAL)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._cache = _CounterCache()

    def get(self, seq: int) -> LedgerRow | None:
        """The row with this sequence number, or None."""
        found = self._conn.execute(f"SELECT {_ROW_COLUMNS} FROM parts WHERE seq = ?", (seq,)).fetchone()
        return None if found is None else _to_row(found)

    def find_part(self, part_id: str) -> list[LedgerRow]:
        """Every row for ``part_id`` (normally one), oldest first."""
        return self._rows("WHERE part_id = ? ORDER BY seq", (part_id,))

    def unacked(self) -> list[LedgerRow]:
        """Rows whose signal the PLC has not acknowledged, oldest first (re-delivery after a restart)."""
        return self._rows("WHERE acked = 0 AND dry_run = 0 AND unsendable IS NULL ORDER BY seq", ())

    def recent(self, n: int) -> list[LedgerRow]:
        """The ``n`` newest rows, newest first."""
        return self._rows("ORDER BY seq DESC LIMIT ?", (n,))

    @property
    def line_epoch(self) -> int:
        """This ledger's line epoch (created with it; see :func:`_add_line_epoch_v4`)."""
        return int(self._conn.execute("SELECT epoch FROM line_identity").fetchone()[0])

    def count(self) -> int:
        """Number of rows."""
        return self._conn.execute("SELECT COUNT(*) FROM parts").fetchone()[0]

    def iter_rows(self, since_seq: int = 0, chunk: int = 1000) -> Iterator[LedgerRow]:
        """Rows with ``seq > since_seq`` in order, fetched ``chunk`` at a time."""
        while True:
            rows = self._rows("WHERE seq > ? ORDER BY seq LIMIT ?", (since_seq, chunk))
            yield from rows
            if len(rows) < chunk:
                return
            since_seq = rows[-1].seq

    def counters(self, since: float | None = None) -> dict:
        """Totals and latency statistics over rows created at or after ``since`` (UTC epoch; None = all).

        Keys: parts, ok, ng, no_verdict, no_verdict_by_reason {reason label: n}, passed_flagged
        (NO_VERDICT signalled as ACCEPT), test_parts, acked, unacked, ack_late, and latency
        {stage: {n, min, median, p99, max}} in seconds for each of :data:`STAGES`. Incremental: after
        the first call only rows inserted or changed since the previous call are read.
        """
        self._cache.sync(self._conn, since)
        return self._cache.counters(since)

    def pragmas(self) -> dict[str, str | int]:
        """The storage settings in force on this connection (for ``doctor``)."""
        return {name: self._conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in ("journal_mode", "synchronous", "user_version")}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "LedgerReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, clause: str, params: tuple) -> list[LedgerRow]:
        return [_to_row(r) for r in self._conn.execute(f"SELECT {_ROW_COLUMNS} FROM parts {clause}", params)]


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _connect(target: str, path: Path, *, uri: bool = False) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(target, isolation_level=None, uri=uri)
        conn.execute("PRAGMA busy_timeout = 2000")
        conn.execute("PRAGMA user_version").fetchone()   # fails here if the file is not a database
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc}") from exc
    return conn


class Ledger(LedgerReader):
    """The runtime's writer. Use one instance from one thread."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        path = Path(path)
        conn = _connect(str(path), path)
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise LedgerError(f"ledger {path}: could not switch to WAL mode")
            conn.execute("PRAGMA synchronous = FULL")
            apply_migrations(conn, name=f"ledger {path}")
        except BaseException:
            conn.close()
            raise
        super().__init__(conn, path)
        self._clock = clock

    @staticmethod
    def open_readonly(path: str | Path) -> LedgerReader:
        """A reader for another process (status, counters); the ledger must already exist."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"ledger {path} does not exist")
        conn = _connect(f"{path.resolve().as_uri()}?mode=ro", path, uri=True)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            conn.close()
            raise LedgerError(f"ledger {path}: schema version {version}, this build reads {SCHEMA_VERSION}; "
                              "start the runtime once to migrate it")
        return LedgerReader(conn, path)

    def reserve(self, part: PartRecord, *, model_hash: str, config_hash: str,
                calibration_version: str, dry_run: bool = False) -> int:
        """Commit the part's row durably and return its sequence number (also set on ``part.seq``).

        ``dry_run`` rows record what *would* have been signalled; they are never sent nor re-sent.

        The part must carry its verdict, reason and what is signalled; ``link`` time stays unknown
        until :meth:`update_link_time`.
        """
        for name in ("verdict", "reason", "signalled"):
            if getattr(part, name) is None:
                raise ValueError(f"part {part.part_id!r}: {name} must be set before it is recorded in the ledger")
        t = part.times
        number = _optional_float   # numpy scalars (np.float32 scores, np.int64 counts) do not bind to SQLite
        cursor = self._conn.execute(
            "INSERT INTO parts (part_id, recipe, capture_time, encoder, source_ref, verdict, reason, reason_label, "
            "signalled, raw_score, score, threshold, detail, decode_s, features_s, scoring_s, total_s, model_hash, "
            "config_hash, calibration_version, test_part, created, dry_run, changed) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "(SELECT IFNULL(MAX(changed), 0) + 1 FROM parts))",
            (part.part_id, part.recipe, float(part.capture_time), None if part.encoder is None else int(part.encoder),
             part.source_ref, part.verdict.value, int(part.reason), part.reason.label, part.signalled.value,
             number(part.raw_score), number(part.score), number(part.threshold), part.detail, number(t.decode),
             number(t.features), number(t.scoring), number(t.total), model_hash, config_hash,
             str(calibration_version), int(part.test_part), self._clock(), int(dry_run)))
        part.seq = cursor.lastrowid
        return part.seq

    def mark_acked(self, seq: int, *, late: bool, when: float) -> None:
        """Record the PLC's acknowledgement of ``seq`` at UTC ``when``; a repeated ack keeps the first."""
        cursor = self._conn.execute(
            "UPDATE parts SET acked = 1, acked_time = ?, ack_late = ?, "
            "changed = (SELECT MAX(changed) + 1 FROM parts) WHERE seq = ? AND acked = 0",
            (float(when), int(late), seq))
        if cursor.rowcount == 0 and self.get(seq) is None:
            raise KeyError(f"ledger {self.path}: no row with seq {seq}")

    def mark_unsendable(self, seq: int, why: str) -> None:
        """Record that ``seq``'s signal can never be sent (a field the wire refuses): it is not re-sent."""
        cursor = self._conn.execute(
            "UPDATE parts SET unsendable = ?, changed = (SELECT MAX(changed) + 1 FROM parts) WHERE seq = ?",
            (why[:500], seq))
        if cursor.rowcount == 0:
            raise KeyError(f"ledger {self.path}: no row with seq {seq}")

    def update_link_time(self, seq: int, seconds: float, *, total: float | None = None) -> None:
        """Record how long delivering ``seq`` took and, when given, the part's final end-to-end time."""
        cursor = self._conn.execute(
            "UPDATE parts SET link_s = ?, total_s = IFNULL(?, total_s), "
            "changed = (SELECT MAX(changed) + 1 FROM parts) WHERE seq = ?",
            (float(seconds), _optional_float(total), seq))
        if cursor.rowcount == 0:
            raise KeyError(f"ledger {self.path}: no row with seq {seq}")
