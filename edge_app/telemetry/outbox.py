"""A durable, ordered outbox of events (SQLite): written by one thread, drained in id order."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class Outbox:
    """Events wait here until the broker has them. Thread-safe; ids increase in append order."""

    def __init__(self, path: str | Path, max_events: int = 1_000_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._max = max_events
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "topic TEXT NOT NULL, payload BLOB NOT NULL)")
        self.dropped = 0

    def append(self, items: list[tuple[str, bytes]]) -> None:
        """Store events in order (one transaction); beyond ``max_events`` the oldest go (counted)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO events (topic, payload) VALUES (?, ?)", items)
            (count,) = self._db.execute("SELECT COUNT(*) FROM events").fetchone()
            excess = count - self._max
            if excess > 0:
                self._db.execute("DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?)",
                                 (excess,))
                self.dropped += excess
            self._db.execute("COMMIT")

    def head_after(self, after_id: int, limit: int) -> list[tuple[int, str, bytes]]:
        """The oldest ``limit`` events with an id above ``after_id``: (id, topic, payload)."""
        with self._lock:
            return self._db.execute("SELECT id, topic, payload FROM events WHERE id > ? ORDER BY id LIMIT ?",
                                    (after_id, limit)).fetchall()

    def remove_through(self, last_id: int) -> None:
        """Forget every event up to and including ``last_id`` (the broker has them)."""
        with self._lock:
            self._db.execute("DELETE FROM events WHERE id <= ?", (last_id,))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
