"""Calibration state with one owner: what a line runs with, where it is stored, the audit chain, and the
runtime's authority over what it is asked to run.

*The calibration* (:class:`Calibration`): thresholds per recipe, reject timing, dry-run; versioned. Every
ledger row carries the version it was decided with.

*The audit log* (:class:`AuditLog`, ``<storage>/calibration/audit.jsonl``): append-only, hash-chained and
keyed. One JSON object per line: ``seq, time (UTC), who, action, target, old, new, reason, result_of,
prev_sha256, mac``. ``prev_sha256`` is the SHA-256 of the previous line's bytes (64 zeros for the first), so
editing or deleting a record breaks the chain at the record after it; ``mac`` is an HMAC-SHA256 of the
record with the line's *device secret* (``<storage>/audit.key``, mode 0600, created by the runtime at its
first start, readable only by the runtime's user), so a chain rebuilt without the secret is refused.
``audit.head`` holds the number of records, the hash of the last one and its own MAC, which catches a
removed or edited *last* record. A change writes its *intent* record before anything is touched and a
*result* record (``result_of`` = the intent's seq) once it is in force or has failed.

Crash consistency: every file is written atomically (temp file, fsync, rename) or appended with one
``write``; what a kill can leave half-done is recognised and completed at the next start or change
(:meth:`AuditLog.repair`, :meth:`CalibrationAuthority.at_start`): a head one record behind the log (the
kill fell between the append and the head), a torn last line, a version file no record created, an
intent with no result, a missing ``current.json`` (rebuilt from the audit's record of what was in force).

*The store* (:class:`CalibrationStore`, ``<storage>/calibration/``):
- ``vNNNN.json``: every version ever made, immutable (created exclusively, never rewritten);
- ``current.json``: the version the line runs (or will run at its next start), replaced atomically;
- ``audit.jsonl`` + ``audit.head``: the audit log;
- ``.lock``: serialises technicians (flock) so versions and audit records never interleave.

A change is committed as: lock -> write the new ``vNNNN.json`` -> audit intent record -> hand it to the
running line, which checks it, writes ``current.json``, records ``runtime.applied`` and swaps it in between
two parts -> audit result record. If the line refuses, nothing changes and the failure is recorded.
Staging (no running line) writes ``current.json`` itself: the line takes it at its next start.

*Authority* (:class:`CalibrationAuthority`) lives in the runtime: a calibration is put in force only when
the audit chain verifies, its ``vNNNN.json`` holds exactly it, and an audit *intent* record newer than the
one behind the calibration in force authorises it (so a replayed, invented or hand-edited version is
refused); the runtime then writes its own audit record of what it applied.

``musc-calibrate`` (calibration/) imports this module; nothing here imports calibration/.
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..record import MAX_THRESHOLD

# The longest camera-to-ejector delay a reject timing may ask for: a verdict deadline further away than
# this is a typo (or an attempt to hold every part forever), and it keeps every deadline a finite time.
MAX_REJECT_DELAY_MS = 600_000.0
MAX_ENCODER_COUNTS = 1 << 40
CALIBRATION_ACTIONS = ("threshold.apply", "rollback", "timing.set", "timing.dry-run")


class CalibrationError(ValueError):
    """A calibration is invalid; nothing was changed."""


class RejectTiming(BaseModel):
    """Camera-to-ejector timing: how long a verdict may take before the part reaches the decision point."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["time", "encoder"] = "time"
    delay_ms: Optional[float] = Field(None, gt=0, le=MAX_REJECT_DELAY_MS, allow_inf_nan=False,
                                      description="time mode: capture -> ejector")
    counts: Optional[int] = Field(None, gt=0, le=MAX_ENCODER_COUNTS,
                                  description="encoder mode: encoder counts capture -> ejector")
    actuator_lead_ms: float = Field(0.0, ge=0, le=MAX_REJECT_DELAY_MS, allow_inf_nan=False,
                                    description="the ejector needs the verdict this much earlier")

    @model_validator(mode="after")
    def _complete(self):
        if self.mode == "time" and self.delay_ms is None:
            raise ValueError("reject_timing.delay_ms is required in time mode")
        if self.mode == "encoder" and self.counts is None:
            raise ValueError("reject_timing.counts is required in encoder mode")
        if self.mode == "time" and self.actuator_lead_ms >= self.delay_ms:
            raise ValueError("reject_timing.actuator_lead_ms must be shorter than delay_ms")
        return self


class RecipeCalibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(..., gt=0, le=MAX_THRESHOLD, allow_inf_nan=False,
                             description="re-scored score at or above which a part is rejected")


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(..., ge=0, le=10**9)
    recipes: dict[str, RecipeCalibration] = Field(default_factory=dict)
    reject_timing: Optional[RejectTiming] = None
    dry_run: bool = False


def parse_calibration(raw: dict, known_recipes: set[str] | None = None, origin: str = "calibration") -> Calibration:
    """Validate a calibration mapping; CalibrationError names every bad key."""
    try:
        calibration = Calibration.model_validate(raw)
    except ValidationError as exc:
        lines = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg'].removeprefix('Value error, ')}"
                          for e in exc.errors())
        raise CalibrationError(f"{origin} is invalid: {lines}") from None
    unknown = set(calibration.recipes) - (known_recipes or set(calibration.recipes))
    if unknown:
        raise CalibrationError(f"{origin} names recipes {sorted(unknown)} that this line does not have "
                               f"({sorted(known_recipes)})")
    return calibration


def calibration_dir(storage_dir: str | Path) -> Path:
    return Path(storage_dir) / "calibration"




def who() -> str:
    """The person (or process) making a change, as recorded in the audit log: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER (containers)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


# -- the device secret ----------------------------------------------------------------------------------------
KEY_BYTES = 32


def audit_key_path(storage_dir: str | Path) -> Path:
    """Where the line's device secret lives: the storage folder itself (owned by the runtime's user), not
    ``calibration/`` (which technicians may write), so a technician cannot delete and replace it."""
    return Path(storage_dir) / "audit.key"


def read_audit_key(storage_dir: str | Path) -> bytes | None:
    """The device secret, or None when it does not exist or this user may not read it."""
    try:
        key = bytes.fromhex(audit_key_path(storage_dir).read_text().strip())
    except (FileNotFoundError, PermissionError, ValueError):
        return None
    return key if len(key) >= 16 else None


def ensure_audit_key(storage_dir: str | Path) -> tuple[bytes, bool]:
    """(the device secret, whether it was created now): created at the runtime's first start, random,
    mode 0600. An existing but unusable file is an error, never silently replaced (replacing it would
    re-key whatever chain lies beside it)."""
    path = audit_key_path(storage_dir)
    if path.exists():
        key = read_audit_key(storage_dir)
        if key is None:
            raise AuditError(f"the device secret {path} is unreadable or damaged; restore it from the backup "
                             "(the audit chain cannot be verified without it)")
        return key, False
    key = secrets.token_bytes(KEY_BYTES)
    atomic_write(path, (key.hex() + "\n").encode(), mode=0o600)
    return key, True


# -- the audit log ----------------------------------------------------------------------------------------
GENESIS = "0" * 64
KEYED = "audit.keyed"      # the record with which an older, unkeyed chain was taken over by a device secret


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
        os.chmod(tmp, mode)   # whatever the umask made of it
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
    """Outcome of :meth:`AuditLog.verify`. ``pending``: what a kill left half-done and the next change
    (or start) completes ("head": the head is one record behind; "torn": a last line never finished)."""

    records: int
    head_sha256: str
    problems: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    keyed: bool = True        # the records' MACs were checked (False: this user cannot read the secret)

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditLog:
    """The audit log of one line's calibration directory. Callers serialise writers (CalibrationStore.lock).

    ``key``: the device secret; without it the log can be read and its hash chain checked, not extended.
    """

    def __init__(self, calibration_dir: str | Path, key: bytes | None = None):
        self.dir = Path(calibration_dir)
        self.path = self.dir / "audit.jsonl"
        self.head_path = self.dir / "audit.head"
        self.key = key

    def _read(self) -> tuple[list[bytes], bytes]:
        """(complete lines, a torn tail after the last newline)."""
        if not self.path.is_file():
            return [], b""
        data = self.path.read_bytes()
        *lines, tail = data.split(b"\n")
        return lines, tail

    def records(self) -> list[dict]:
        """Every complete record, oldest first (AuditError naming the line for one that is not JSON)."""
        out = []
        for number, line in enumerate(self._read()[0], 1):
            try:
                out.append(json.loads(line))
            except (ValueError, UnicodeDecodeError) as exc:
                raise AuditError(f"{self.path} line {number} is not a JSON record ({exc}); "
                                 "run `musc-calibrate audit verify`") from None
        return out

    def _mac(self, data: bytes) -> str:
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()

    def _mac_ok(self, record: dict) -> bool:
        mac = record.get("mac")
        body = {k: v for k, v in record.items() if k != "mac"}
        return isinstance(mac, str) and hmac.compare_digest(mac, self._mac(_canonical(body)))

    def _head_body(self, records: int, sha: str) -> bytes:
        return f"{records}:{sha}".encode()

    def append(self, *, who: str, action: str, target: str, old: Any, new: Any, reason: str,
               result_of: int | None = None) -> dict:
        """Append one record durably (fsync) and move the head; returns the record. Completes what a kill
        left half-done first (see :class:`Verification`)."""
        if not reason or not reason.strip():
            raise AuditError("a reason is required for every change (--reason \"...\")")
        if self.key is None:
            raise AuditError(f"the audit log {self.path} can only be extended with the line's device secret "
                             f"({audit_key_path(self.dir.parent)}, readable by the runtime's user): run this as "
                             "that user, or make the change on the running line")
        check = self.verify()
        if not check.ok:
            raise AuditError(f"the audit log {self.path} does not verify ({check.problems[0]}); no change is made "
                             "until it is restored")
        if check.pending:
            check = self._complete(check)
        return self._write(check, who=who, action=action, target=target, old=old, new=new, reason=reason.strip(),
                           result_of=result_of)

    def _write(self, check: Verification, **fields: Any) -> dict:
        record = {"seq": check.records + 1, "time": utc_now(), **fields, "prev_sha256": check.head_sha256}
        record["mac"] = self._mac(_canonical(record))
        line = _canonical(record)
        self.dir.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), "wb") as handle:
            handle.write(line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._write_head(record["seq"], _sha256(line))
        return record

    def _write_head(self, records: int, sha: str) -> None:
        atomic_write(self.head_path, _canonical({"records": records, "sha256": sha,
                                                 "mac": self._mac(self._head_body(records, sha))}) + b"\n")

    def repair(self) -> list[str]:
        """Complete what a kill left half-done (a torn last line, a head one record behind); returns what
        was done. Nothing is touched when the log has real problems (verify() lists them)."""
        check = self.verify()
        if not check.ok or not check.pending or self.key is None:
            return []
        done = list(check.pending)
        self._complete(check)
        return done

    def _complete(self, check: Verification) -> Verification:
        if "torn" in check.pending:
            data = self.path.read_bytes()
            with open(self.path, "r+b") as handle:
                handle.truncate(data.rindex(b"\n") + 1 if b"\n" in data else 0)
                handle.flush()
                os.fsync(handle.fileno())
        self._write_head(check.records, check.head_sha256)
        return Verification(check.records, check.head_sha256)

    def adopt(self, who: str) -> bool:
        """Key an older, unkeyed chain with the device secret just created: a MAC'd ``audit.keyed`` record
        vouches for everything before it. Only when the chain verifies without keys; returns whether it did."""
        check = self._verify(macs=False)
        if not check.ok or not check.records or self.key is None:
            return False
        if check.pending:
            check = self._complete(check)
        self._write(check, who=who, action=KEYED, target="audit log", old=None,
                    new={"records": check.records, "sha256": check.head_sha256},
                    reason="device secret created; the records before this one were written without it",
                    result_of=None)
        return True

    def verify(self) -> Verification:
        """Check the chain, the sequence numbers, the MACs (with the key) and the head; every problem found
        is listed, and what a kill left half-done is listed as ``pending``."""
        return self._verify(macs=self.key is not None)

    def _verify(self, macs: bool) -> Verification:
        lines, tail = self._read()
        prev, shas = GENESIS, [GENESIS]
        result = Verification(records=len(lines), head_sha256=GENESIS, keyed=macs)
        records: list[dict | None] = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError):
                result.problems.append(f"record {number} is not valid JSON (edited or truncated)")
                record = None
            else:
                if record.get("prev_sha256") != prev:
                    result.problems.append(f"record {number}: chain broken, the record before it was edited or "
                                           "deleted")
                if record.get("seq") != number:
                    result.problems.append(f"record {number} carries seq {record.get('seq')!r}: a record was "
                                           "deleted or inserted")
            records.append(record)
            prev = _sha256(line)
            shas.append(prev)
        result.head_sha256 = prev
        legacy = 0   # records before a valid audit.keyed record were written before the line had a secret
        if macs:
            first = next((n for n, r in enumerate(records, 1) if r is not None and self._mac_ok(r)), None)
            if first is not None and records[first - 1].get("action") == KEYED:
                legacy = first - 1
            unkeyed = [n for n, r in enumerate(records, 1) if n > legacy and r is not None and not self._mac_ok(r)]
            if unkeyed:
                result.problems.append(f"record {unkeyed[0]} (and {len(unkeyed) - 1} more) carries no valid MAC: "
                                       "written without this line's device secret (a rebuilt or forged chain)"
                                       if len(unkeyed) > 1 else f"record {unkeyed[0]} carries no valid MAC: "
                                       "written without this line's device secret (a rebuilt or forged chain)")
        self._check_head(result, shas, legacy, macs)
        if tail:
            if result.ok:
                result.pending.append("torn")
            else:
                result.problems.append("the last line of the log is incomplete")
        return result

    def _check_head(self, result: Verification, shas: list[str], legacy: int, macs: bool) -> None:
        n, head = result.records, self._head()

        def matches(count: int) -> bool:
            if head is None:
                return count == 0
            if head.get("records") != count or head.get("sha256") != shas[count]:
                return False
            if not macs or ("mac" not in head and count <= legacy):
                return True
            mac = head.get("mac")
            return isinstance(mac, str) and hmac.compare_digest(mac, self._mac(self._head_body(count, shas[count])))

        if matches(n):
            return
        if n and matches(n - 1) and not result.problems:
            result.pending.append("head")   # killed between the append and the head: the record is complete
            return
        if head is None:
            result.problems.append(f"{self.head_path.name} is missing but there are {n} records")
        else:
            result.problems.append(f"{self.head_path.name} says {head.get('records')} records ending in "
                                   f"{str(head.get('sha256'))[:12]}..., the log has {n} ending in "
                                   f"{shas[n][:12]}...: the last record was edited or deleted, or the head "
                                   "was not written with this line's device secret")

    def record_change(self, *, who: str, action: str, target: str, old: Any, new: Any, reason: str,
                      perform: Callable[[], dict]) -> tuple[dict, dict]:
        """Write the intent record, run ``perform``, then write its result record (ok, failed, or unknown
        when the exception says the outcome is not known: ``outcome_unknown = True``).

        Returns (intent record, what ``perform`` returned); ``perform``'s exception propagates after the
        result is recorded.
        """
        intent = self.append(who=who, action=action, target=target, old=old, new=new, reason=reason)
        try:
            outcome = perform()
        except Exception as exc:
            kind = "unknown" if getattr(exc, "outcome_unknown", False) else "failed"
            self.append(who=who, action=action, target=target, old=None, new={kind: str(exc)},
                        reason=reason, result_of=intent["seq"])
            raise
        self.append(who=who, action=action, target=target, old=None, new={"ok": outcome}, reason=reason,
                    result_of=intent["seq"])
        return intent, outcome

    def _head(self) -> dict | None:
        if not self.head_path.is_file():
            return None
        try:
            head = json.loads(self.head_path.read_text())
        except ValueError:
            return {"records": None, "sha256": "unreadable"}
        return head if isinstance(head, dict) else {"records": None, "sha256": "unreadable"}


# -- the store --------------------------------------------------------------------------------------------
_VERSION_FILE = re.compile(r"^v(\d{4,})\.json$")


class StoreError(ValueError):
    """The calibration files are missing, invalid or inconsistent; nothing was changed."""


def calibration_bytes(calibration: Calibration) -> bytes:
    """The canonical file content of a calibration (stable key order, so equal calibrations hash equal)."""
    return (json.dumps(calibration.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_creators(records: list[dict]) -> dict[int, dict]:
    """version -> the audit record that created it (rollbacks name a version again; the first one counts)."""
    created: dict[int, dict] = {}
    for record in records:
        new = record.get("new")
        if record.get("result_of") is None and isinstance(new, dict) and "file_sha256" in new:
            created.setdefault(new.get("version"), record)
    return created


def audited_in_force(records: list[dict]) -> tuple[int, int] | None:
    """(version, authorising intent seq) that the audit log says the line runs or will run at its next start:
    the newest of what the runtime recorded as applied and what was staged successfully; None when no
    calibration was ever put in force (the line runs its config)."""
    by_seq = {r.get("seq"): r for r in records}
    found = None
    for record in records:
        new, of = record.get("new"), record.get("result_of")
        if record.get("action") == "runtime.applied" and isinstance(new, dict) and isinstance(of, int):
            found = (new.get("version"), of)
        elif of is not None and isinstance(new, dict) and isinstance(new.get("ok"), dict) \
                and new["ok"].get("staged") and isinstance(by_seq.get(of, {}).get("new"), dict):
            found = (by_seq[of]["new"].get("version"), of)
    return found if found is not None and isinstance(found[0], int) else None


class CalibrationStore:
    """The calibration directory of one line. ``key``: the device secret (None: read-only use, or an
    ``audit`` that appends through the running line)."""

    def __init__(self, storage_dir: str | Path, key: bytes | None = None, audit: AuditLog | None = None):
        self.storage = Path(storage_dir)
        self.dir = calibration_dir(storage_dir)
        self.current_path = self.dir / "current.json"
        self.audit = audit or AuditLog(self.dir, key)

    def version_path(self, version: int) -> Path:
        return self.dir / f"v{version:04d}.json"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for one change (blocks while another technician's change runs)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- reading ---------------------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Stored version numbers, ascending."""
        if not self.dir.is_dir():
            return []
        found = (_VERSION_FILE.match(p.name) for p in self.dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _read(self, path: Path, known_recipes: set[str] | None) -> Calibration:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{path} does not exist") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise StoreError(f"{path} must hold a JSON object, not {type(raw).__name__}")
        try:
            return parse_calibration(raw, known_recipes, str(path))
        except CalibrationError as exc:
            raise StoreError(str(exc)) from None

    def load_version(self, version: int, known_recipes: set[str] | None = None) -> Calibration:
        """A stored version, validated (StoreError naming the file when it is missing or invalid)."""
        path = self.version_path(version)
        if not path.is_file():
            raise StoreError(f"calibration version {version} does not exist (stored versions: "
                             f"{self.versions() or 'none'})")
        calibration = self._read(path, known_recipes)
        if calibration.version != version:
            raise StoreError(f"{path} says version {calibration.version}; the file was edited by hand")
        return calibration

    def current(self, known_recipes: set[str] | None = None) -> Calibration | None:
        """The calibration in ``current.json`` (None if there is none), checked against its version file: a
        hand edit is refused with a pointer to ``rollback``. A missing ``current.json`` the audit log says
        should exist is rebuilt by the runtime at its next start (:meth:`CalibrationAuthority.at_start`)."""
        if not self.current_path.is_file():
            return None
        hint = "; restore a stored version with `musc-calibrate rollback --to N --reason ...`"
        try:
            calibration = self._read(self.current_path, known_recipes)
        except StoreError as exc:
            raise StoreError(f"{exc}{hint}") from None
        stored = self.version_path(calibration.version)
        if not stored.is_file():
            raise StoreError(f"{self.current_path} claims version {calibration.version}, which was never stored "
                             f"(edited by hand?){hint}")
        if stored.read_bytes() != calibration_bytes(calibration):
            raise StoreError(f"{self.current_path} differs from {stored.name} (edited by hand?){hint}")
        return calibration

    def next_version(self) -> int:
        versions = self.versions()
        return versions[-1] + 1 if versions else 1

    # -- writing (hold lock()) -------------------------------------------------------------------------------
    def save_version(self, calibration: Calibration) -> str:
        """Create ``vNNNN.json`` (refusing to overwrite one) atomically; returns the file's sha256."""
        data = calibration_bytes(calibration)
        path = self.version_path(calibration.version)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)   # exclusive and atomic: a kill leaves no half-written version file
        except FileExistsError:
            raise StoreError(f"{path} already exists; versions are never rewritten") from None
        finally:
            tmp.unlink(missing_ok=True)
        return file_sha256(data)

    def write_current(self, calibration: Calibration) -> None:
        atomic_write(self.current_path, calibration_bytes(calibration))

    def record_baseline(self, baseline: Calibration, *, who: str) -> None:
        """Store version 0 (what the line runs before its first calibration, from its config) so it can be
        rolled back to; ``current.json`` is not touched."""
        sha = self.save_version(baseline)
        self.audit.append(who=who, action="baseline", target="calibration v0000", old=None,
                          new={**baseline.model_dump(mode="json"), "file_sha256": sha},
                          reason="thresholds of the line config, in force before the first calibration")

    def commit(self, new: Calibration, *, who: str, action: str, reason: str, old: dict | None,
               apply_live: Callable[[dict], dict] | None, create: bool) -> dict:
        """Record and put ``new`` in force (see the module docstring); returns the line's reply ({} staged).

        ``create``: ``new`` is a new version to store (its file must not exist); otherwise it is a stored
        version brought back (rollback). ``old`` is what it replaces, as recorded. ``apply_live`` sends the
        calibration to the running line (which writes ``current.json``) and returns its acknowledgement;
        None stages it: ``current.json`` is written here for the line's next start.
        """
        payload = new.model_dump(mode="json")
        sha = self.save_version(new) if create else file_sha256(self.version_path(new.version).read_bytes())

        def perform() -> dict:
            if apply_live is None:
                self.write_current(new)
                return {"staged": True}
            reply = apply_live(payload)
            if reply.get("version") != new.version:
                raise StoreError(f"the line acknowledged version {reply.get('version')!r}, not {new.version}")
            return {**reply, "staged": False}

        _, outcome = self.audit.record_change(
            who=who, action=action, target=f"calibration v{new.version:04d}",
            old=old, new={**payload, "file_sha256": sha}, reason=reason, perform=perform)
        return outcome

    # -- recovery (hold lock(), with the device secret) ------------------------------------------------------
    def drop_unrecorded_versions(self, records: list[dict], who: str) -> list[int]:
        """A version file no audit record created, numbered one above every recorded one: written by a change
        that was killed before its intent record (a change writes one file, under the lock). It was never in
        force; it is moved aside (``.vNNNN.json.interrupted``), with a record. Any other unrecorded file is
        left for `audit verify` to report (StoreError when there are several: not what a kill leaves)."""
        created = version_creators(records)
        top = max((v for v in created if isinstance(v, int)), default=-1)
        orphans = [v for v in self.versions() if v not in created and v > top]
        if not orphans:
            return []
        if orphans != [top + 1]:
            raise StoreError(f"version files {orphans} were created by no audit record (a change leaves at most one, "
                             f"v{top + 1:04d}): was the audit log cut short? run `musc-calibrate audit verify`")
        path = self.version_path(orphans[0])
        os.replace(path, path.with_name(f".{path.name}.interrupted"))
        self.audit.append(who=who, action="recovery", target="calibration files", old={"orphans": orphans},
                          new=None, reason=f"{path.name} was written by a change that was interrupted before its "
                                           f"audit record; never in force, moved aside to .{path.name}.interrupted")
        return orphans

    def close_open_intents(self, who: str, in_force_intent: int) -> list[int]:
        """Give every change that was interrupted before its result record one: ok when the line took it
        (or current.json holds it: ``in_force_intent``), else interrupted. Returns the intents closed."""
        records = self.audit.records()
        results = {r["result_of"] for r in records if isinstance(r.get("result_of"), int)}
        closed = []
        for record in records:
            seq, action = record.get("seq"), str(record.get("action"))
            if record.get("result_of") is not None or seq in results or action in ("baseline", "recovery", KEYED) \
                    or action.startswith("runtime."):
                continue
            outcome = {"ok": {"recovered": "in force: current.json holds it"}} if seq == in_force_intent else \
                {"interrupted": "the change was cut off before its outcome was recorded; nothing it would have "
                                "changed in the calibration is in force"
                 if record.get("target", "").startswith("calibration") else
                 "the change was cut off before its outcome was recorded; the line restores the pool it last "
                 "saved"}
            self.audit.append(who=who, action=action, target=record.get("target", ""), old=None, new=outcome,
                              reason="recovery at start", result_of=seq)
            closed.append(seq)
        return closed

    # -- integrity -------------------------------------------------------------------------------------------
    def check_versions(self, records: list[dict]) -> list[str]:
        """Problems with the version files against the audit records that created them."""
        created = {v: r["new"]["file_sha256"] for v, r in version_creators(records).items()}
        problems = []
        for version in self.versions():
            path = self.version_path(version)
            if version not in created:
                problems.append(f"{path.name} was not created by any audit record")
            elif file_sha256(path.read_bytes()) != created[version]:
                problems.append(f"{path.name} was changed after it was recorded (sha256 differs)")
        for version in set(created) - set(self.versions()):
            problems.append(f"version {version} is recorded in the audit log but its file is missing")
        try:
            current = self.current()
        except StoreError as exc:
            problems.append(str(exc))
        else:
            audited = audited_in_force(records)
            if current is None and audited is not None:
                problems.append(f"current.json is missing; the audit log says v{audited[0]} is in force (the line "
                                "restores it at its next start)")
        return problems


# -- the runtime's authority ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Authorised:
    """A calibration and the audit intent record (its ``seq``) that put it in force; seq 0 = none (YAML)."""

    calibration: Calibration | None
    intent_seq: int = 0


# What a technician's client may append through the running line (the runtime's own actions are its own).
CLIENT_ACTIONS = frozenset({"baseline", *CALIBRATION_ACTIONS, "pool.purge", "pool.freeze", "pool.unfreeze",
                            "pool.reseed", "pool.seed", "timing.test-fire"})


class CalibrationAuthority:
    """The runtime's own check of what it is asked to run, against the version files and the audit chain.
    It holds the device secret (created at the first start) and so is the one writer that can always extend
    the audit log."""

    def __init__(self, storage_dir: str | Path, known_recipes: set[str], who: str) -> None:
        try:
            key, self.key_created = ensure_audit_key(storage_dir)
        except (AuditError, OSError) as exc:
            raise CalibrationError(f"the audit log's device secret: {exc}") from None
        self.store = CalibrationStore(storage_dir, key)
        self.known_recipes, self.who = known_recipes, who

    def at_start(self, line: str) -> Authorised:
        """The audited calibration the line starts with (none: the YAML thresholds), after completing what a
        kill left half-done (see the module docstring); CalibrationError with a one-line reason when
        ``current.json``, its version file and the audit log disagree, or when it is older than what the line
        last applied (an old version file copied over it). A calibration staged since the last run is
        recorded as applied."""
        with self.store.lock():
            try:
                return self._start(line)
            except (StoreError, AuditError, OSError) as exc:
                raise CalibrationError(str(exc)) from None

    def _start(self, line: str) -> Authorised:
        audit = self.store.audit
        if self.key_created:
            audit.adopt(self.who)
        audit.repair()
        check = audit.verify()
        if not check.ok:
            raise CalibrationError(f"the audit log does not verify ({check.problems[0]}); run `musc-calibrate "
                                   "audit verify`")
        records = audit.records()
        self.store.drop_unrecorded_versions(records, self.who)
        calibration = self.store.current(self.known_recipes)
        if calibration is None:
            calibration = self._restore_current(audit.records())
        found = Authorised(None) if calibration is None else \
            Authorised(calibration, self._intent_for(calibration, "current.json"))
        last = max((r["result_of"] for r in audit.records()
                    if r.get("action") == "runtime.applied" and isinstance(r.get("result_of"), int)), default=0)
        if found.intent_seq and found.intent_seq < last:
            raise CalibrationError(f"current.json holds version {calibration.version} (audit record "
                                   f"{found.intent_seq}), older than what this line last applied (audit record "
                                   f"{last}); restore it with `musc-calibrate rollback`")
        if found.intent_seq > last:   # staged while the line was down (or the line was killed inside its apply)
            self.record_applied(found, line)
        self.store.close_open_intents(self.who, found.intent_seq)
        return found

    def _restore_current(self, records: list[dict]) -> Calibration | None:
        """``current.json`` is missing: the version the audit log says is in force, written back (with a
        recovery record); None when no calibration was ever put in force. Never a silent fall-back to the
        config's thresholds while the audit names a version."""
        audited = audited_in_force(records)
        if audited is None:
            return None
        version, intent = audited
        try:
            calibration = self.store.load_version(version, self.known_recipes)
        except StoreError as exc:
            raise CalibrationError(f"current.json is missing and the version the audit log says is in force "
                                   f"cannot be restored ({exc}); restore one with `musc-calibrate rollback "
                                   "--stage`") from None
        if self._intent_for(calibration, f"version {version}") < intent:
            raise CalibrationError(f"current.json is missing and v{version:04d}.json is not the file audit record "
                                   f"{intent} put in force; restore one with `musc-calibrate rollback --stage`")
        self.store.write_current(calibration)
        self.store.audit.append(who=self.who, action="recovery", target=f"calibration v{version:04d}", old=None,
                                new={"current.json": version}, reason=f"current.json was missing; audit record "
                                f"{intent} put v{version} in force, so it was written back")
        return calibration

    def check_apply(self, calibration: Calibration, in_force: Authorised) -> Authorised:
        """``calibration`` with its authorising intent record, or CalibrationError (nothing changes)."""
        stored = self.store.version_path(calibration.version)
        if not stored.is_file() or stored.read_bytes() != calibration_bytes(calibration):
            raise CalibrationError(f"version {calibration.version} is not the stored {stored.name}: a calibration "
                                   "reaches the line only through `musc-calibrate` (which stores and audits it)")
        seq = self._intent_for(calibration, f"version {calibration.version}")
        if seq <= in_force.intent_seq:
            raise CalibrationError(f"version {calibration.version} is authorised by audit record {seq}, not newer "
                                   f"than record {in_force.intent_seq} behind the calibration in force: a replay")
        return Authorised(calibration, seq)

    def put_in_force(self, calibration: Calibration, in_force: Authorised, line: str) -> Authorised:
        """Check ``calibration`` (:meth:`check_apply`), write ``current.json`` (what a restart runs), then the
        runtime's own audit record. A kill between the two is completed at the next start (the file holds a
        newer audited version than the last one applied, so it is recorded as applied then)."""
        authorised = self.check_apply(calibration, in_force)
        self.store.write_current(calibration)
        self.record_applied(authorised, line)
        return authorised

    def record_applied(self, applied: Authorised, line: str) -> None:
        """The runtime's own audit record of the calibration it has just put in force."""
        c = applied.calibration
        self.store.audit.append(
            who=self.who, action="runtime.applied", target=f"calibration v{c.version:04d}", old=None,
            new={"version": c.version, "thresholds": {k: r.threshold for k, r in c.recipes.items()},
                 "reject_timing": None if c.reject_timing is None else c.reject_timing.model_dump(mode="json"),
                 "dry_run": c.dry_run, "line": line}, reason="in force on the running line", result_of=applied.intent_seq)

    def record_fast_path(self, event) -> None:
        """The runtime's own audit record of its fast-path decision (``runtime/fast_path.py``'s event)."""
        with self.store.lock():
            self.store.audit.append(
                who=self.who, action="runtime.fast_path", target="feature model", old=event.old_model,
                new={"model_sha256": event.new_model, "scorer": event.scorer, "switched": event.switched},
                reason=event.reason)

    def append_for_client(self, record: dict) -> dict:
        """Append a technician client's record (one that cannot read the device secret) to the audit log; the
        client holds the store's lock. Only the client's own kinds of record, never the runtime's."""
        action = record.get("action")
        if action not in CLIENT_ACTIONS:
            raise AuditError(f"a client may not append {str(action)[:40]!r} records")
        fields = {k: record.get(k) for k in ("who", "action", "target", "old", "new", "reason", "result_of")}
        if not all(isinstance(fields[k], str) for k in ("who", "target", "reason")) or \
                not (fields["result_of"] is None or type(fields["result_of"]) is int):
            raise AuditError("an audit record needs string who, target and reason, and an integer result_of")
        return self.store.audit.append(**fields)

    def _intent_for(self, calibration: Calibration, what: str) -> int:
        """Seq of the newest intent record that stored or brought back exactly this version file."""
        check = self.store.audit.verify()
        if not check.ok:
            raise CalibrationError(f"{what}: the audit log does not verify ({check.problems[0]}); "
                                   "run `musc-calibrate audit verify`")
        try:
            records = self.store.audit.records()
        except AuditError as exc:
            raise CalibrationError(str(exc)) from None
        sha = file_sha256(self.store.version_path(calibration.version).read_bytes())
        target = f"calibration v{calibration.version:04d}"
        seqs = [r["seq"] for r in records if r.get("result_of") is None and r.get("target") == target
                and isinstance(r.get("new"), dict) and r["new"].get("file_sha256") == sha]
        if not seqs:
            audited = any(r.get("result_of") is None and r.get("target") == target for r in records)
            why = (f"v{calibration.version:04d}.json differs from the file the audit log recorded for it (edited by "
                   "hand?)" if audited else
                   f"calibration version {calibration.version} was never recorded in the audit log")
            raise CalibrationError(f"{what}: {why}; restore an audited version with `musc-calibrate rollback`")
        return seqs[-1]
