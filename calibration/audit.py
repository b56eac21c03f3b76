"""Append-only, hash-chained audit log of every change made to a line (``<storage>/calibration/audit.jsonl``).

One JSON object per line: ``seq, time (UTC), who, action, target, old, new, reason, result_of, prev_sha256``.
``prev_sha256`` is the SHA-256 of the previous line's bytes (64 zeros for the first), so editing or
deleting any record breaks the chain at the record after it; ``audit.head`` holds the number of records
and the hash of the last one, which catches an edited or removed *last* record. A change writes its
*intent* record before anything is touched and a *result* record (``result_of`` = the intent's seq)
once it is in force or has failed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

GENESIS = "0" * 64


class AuditError(RuntimeError):
    """The audit log cannot be read or extended; nothing was changed."""


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def atomic_write(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)   # a full disk leaves neither a half-written file nor its temp
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def utc_now() -> str:
    """Current UTC time as ISO-8601 with a Z suffix, to the millisecond."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


@dataclass
class Verification:
    """Outcome of :meth:`AuditLog.verify`."""

    records: int
    head_sha256: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditLog:
    """The audit log of one line's calibration directory. Callers serialise writers (CalibrationStore.lock)."""

    def __init__(self, calibration_dir: str | Path):
        self.dir = Path(calibration_dir)
        self.path = self.dir / "audit.jsonl"
        self.head_path = self.dir / "audit.head"

    def _lines(self) -> list[bytes]:
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        return data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")

    def records(self) -> list[dict]:
        """Every record, oldest first (AuditError naming the line for one that is not JSON)."""
        out = []
        for number, line in enumerate(self._lines(), 1):
            try:
                out.append(json.loads(line))
            except (ValueError, UnicodeDecodeError) as exc:
                raise AuditError(f"{self.path} line {number} is not a JSON record ({exc}); "
                                 "run `musc-calibrate audit verify`") from None
        return out

    def append(self, *, who: str, action: str, target: str, old: Any, new: Any, reason: str,
               result_of: int | None = None) -> dict:
        """Append one record durably (fsync) and move the head; returns the record."""
        if not reason or not reason.strip():
            raise AuditError("a reason is required for every change (--reason \"...\")")
        check = self.verify()
        if not check.ok:
            raise AuditError(f"the audit log {self.path} does not verify ({check.problems[0]}); no change is made "
                             "until it is restored")
        record = {"seq": check.records + 1, "time": utc_now(), "who": who, "action": action, "target": target,
                  "old": old, "new": new, "reason": reason.strip(), "result_of": result_of,
                  "prev_sha256": check.head_sha256}
        line = _canonical(record)
        self.dir.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), "wb") as handle:
            handle.write(line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        atomic_write(self.head_path, _canonical({"records": record["seq"], "sha256": _sha256(line)}) + b"\n")
        return record

    def record_change(self, *, who: str, action: str, target: str, old: Any, new: Any, reason: str,
                      perform: Callable[[], dict]) -> tuple[dict, dict]:
        """Write the intent record, run ``perform``, then write its result record (ok or failed).

        Returns (intent record, what ``perform`` returned); ``perform``'s exception propagates after the
        failure is recorded.
        """
        intent = self.append(who=who, action=action, target=target, old=old, new=new, reason=reason)
        try:
            outcome = perform()
        except Exception as exc:
            self.append(who=who, action=action, target=target, old=None, new={"failed": str(exc)},
                        reason=reason, result_of=intent["seq"])
            raise
        self.append(who=who, action=action, target=target, old=None, new={"ok": outcome}, reason=reason,
                    result_of=intent["seq"])
        return intent, outcome

    def verify(self) -> Verification:
        """Check the chain, the sequence numbers and the head; every problem found is listed."""
        lines = self._lines()
        prev = GENESIS
        result = Verification(records=len(lines), head_sha256=GENESIS)
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                result.problems.append(f"record {number} is not valid JSON (edited or truncated)")
                prev = _sha256(line)
                continue
            if record.get("prev_sha256") != prev:
                result.problems.append(f"record {number}: chain broken, the record before it was edited or deleted")
            if record.get("seq") != number:
                result.problems.append(f"record {number} carries seq {record.get('seq')!r}: a record was deleted "
                                       "or inserted")
            prev = _sha256(line)
        result.head_sha256 = prev
        head = self._head()
        if head is None:
            if lines:
                result.problems.append(f"{self.head_path.name} is missing but there are {len(lines)} records")
        elif head != {"records": len(lines), "sha256": prev}:
            result.problems.append(f"{self.head_path.name} says {head.get('records')} records ending in "
                                   f"{str(head.get('sha256'))[:12]}..., the log has {len(lines)} ending in "
                                   f"{prev[:12]}...: the last record was edited or deleted")
        return result

    def _head(self) -> dict | None:
        if not self.head_path.is_file():
            return None
        try:
            head = json.loads(self.head_path.read_text())
        except ValueError:
            return {"records": None, "sha256": "unreadable"}
        return head if isinstance(head, dict) else {"records": None, "sha256": "unreadable"}
