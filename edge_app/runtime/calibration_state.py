"""Calibration state with one owner: what a line runs with, where it is stored, the audit chain, and the
runtime's authority over what it is asked to run.

*The calibration* (:class:`Calibration`): thresholds per recipe, reject timing, dry-run; versioned. Every
ledger row carries the version it was decided with.

*The audit log* (:class:`AuditLog`, ``<storage>/calibration/audit.jsonl``): append-only, hash-chained. One
JSON object per line: ``seq, time (UTC), who, action, target, old, new, reason, result_of, prev_sha256``.
``prev_sha256`` is the SHA-256 of the previous line's bytes (64 zeros for the first), so editing or deleting
any record breaks the chain at the record after it; ``audit.head`` holds the number of records and the hash
of the last one, which catches an edited or removed *last* record. A change writes its *intent* record
before anything is touched and a *result* record (``result_of`` = the intent's seq) once it is in force or
has failed.

*The store* (:class:`CalibrationStore`, ``<storage>/calibration/``):
- ``vNNNN.json``: every version ever made, immutable (created exclusively, never rewritten);
- ``current.json``: the version the line runs (or will run at its next start), replaced atomically;
- ``audit.jsonl`` + ``audit.head``: the audit log;
- ``.lock``: serialises technicians (flock) so versions and audit records never interleave.

A change is committed as: lock -> write the new ``vNNNN.json`` -> audit intent record -> hand it to the
running line (which swaps it in between two parts and acknowledges the version) -> ``current.json`` ->
audit result record. If the line refuses or is unreachable, ``current.json`` is untouched and the
failure is recorded. Staging (no running line) skips the hand-over: the line loads ``current.json`` at
its next start.

*Authority* (:class:`CalibrationAuthority`) lives in the runtime: a calibration is put in force only when
the audit chain verifies, its ``vNNNN.json`` holds exactly it, and an audit *intent* record newer than the
one behind the calibration in force authorises it (so a replayed, invented or hand-edited version is
refused); the runtime then writes its own audit record of what it applied.

``musc-calibrate`` (calibration/) imports this module; nothing here imports calibration/.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..record import MAX_THRESHOLD

class CalibrationError(ValueError):
    """A calibration is invalid; nothing was changed."""


class RejectTiming(BaseModel):
    """Camera-to-ejector timing: how long a verdict may take before the part reaches the decision point."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["time", "encoder"] = "time"
    delay_ms: Optional[float] = Field(None, gt=0, description="time mode: capture -> ejector")
    counts: Optional[int] = Field(None, gt=0, description="encoder mode: encoder counts capture -> ejector")
    actuator_lead_ms: float = Field(0.0, ge=0, description="the ejector needs the verdict this much earlier")

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

    version: int = Field(..., ge=0)
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


# -- the audit log ----------------------------------------------------------------------------------------
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


# -- the store --------------------------------------------------------------------------------------------
_VERSION_FILE = re.compile(r"^v(\d{4,})\.json$")


class StoreError(ValueError):
    """The calibration files are missing, invalid or inconsistent; nothing was changed."""


def calibration_bytes(calibration: Calibration) -> bytes:
    """The canonical file content of a calibration (stable key order, so equal calibrations hash equal)."""
    return (json.dumps(calibration.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CalibrationStore:
    """The calibration directory of one line."""

    def __init__(self, storage_dir: str | Path):
        self.storage = Path(storage_dir)
        self.dir = calibration_dir(storage_dir)
        self.current_path = self.dir / "current.json"
        self.audit = AuditLog(self.dir)

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
        """The calibration in ``current.json`` (None if the line was never calibrated), checked against its
        version file: a hand edit is refused with a pointer to ``rollback``."""
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
        """Create ``vNNNN.json`` (refusing to overwrite one); returns the file's sha256."""
        data = calibration_bytes(calibration)
        path = self.version_path(calibration.version)
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise StoreError(f"{path} already exists; versions are never rewritten") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
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
        calibration to the running line and returns its acknowledgement; None stages it for the next start.
        """
        payload = new.model_dump(mode="json")
        sha = self.save_version(new) if create else file_sha256(self.version_path(new.version).read_bytes())

        def perform() -> dict:
            reply = apply_live(payload) if apply_live is not None else {}
            if apply_live is not None and reply.get("version") != new.version:
                raise StoreError(f"the line acknowledged version {reply.get('version')!r}, not {new.version}")
            self.write_current(new)
            return {**reply, "staged": apply_live is None}

        _, outcome = self.audit.record_change(
            who=who, action=action, target=f"calibration v{new.version:04d}",
            old=old, new={**payload, "file_sha256": sha}, reason=reason, perform=perform)
        return outcome

    # -- integrity -------------------------------------------------------------------------------------------
    def check_versions(self, records: list[dict]) -> list[str]:
        """Problems with the version files against the audit records that created them."""
        created = {}
        for record in records:
            new = record.get("new")
            if record.get("result_of") is None and isinstance(new, dict) and "file_sha256" in new:
                created.setdefault(new.get("version"), new["file_sha256"])
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
            self.current()
        except StoreError as exc:
            problems.append(str(exc))
        return problems


# -- the runtime's authority ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Authorised:
    """A calibration and the audit intent record (its ``seq``) that put it in force; seq 0 = none (YAML)."""

    calibration: Calibration | None
    intent_seq: int = 0


class CalibrationAuthority:
    """The runtime's own check of what it is asked to run, against the version files and the audit chain."""

    def __init__(self, storage_dir: str | Path, known_recipes: set[str], who: str) -> None:
        self.store = CalibrationStore(storage_dir)
        self.known_recipes, self.who = known_recipes, who

    def at_start(self, line: str) -> Authorised:
        """The audited calibration in ``current.json`` (none: the YAML thresholds); CalibrationError
        with a one-line reason when ``current.json``, its version file and the audit log disagree, or when
        it is older than what the line last applied (an old version file copied over it). A calibration
        staged since the last run is recorded as applied."""
        try:
            calibration = self.store.current(self.known_recipes)
        except StoreError as exc:
            raise CalibrationError(str(exc)) from None
        if calibration is None:
            return Authorised(None)
        found = Authorised(calibration, self._intent_for(calibration, "current.json"))
        last = max((r["result_of"] for r in self.store.audit.records()
                    if r.get("action") == "runtime.applied" and isinstance(r.get("result_of"), int)), default=0)
        if found.intent_seq < last:
            raise CalibrationError(f"current.json holds version {calibration.version} (audit record "
                                   f"{found.intent_seq}), older than what this line last applied (audit record "
                                   f"{last}); restore it with `musc-calibrate rollback`")
        if found.intent_seq > last:   # staged while the line was down
            with self.store.lock():
                self.record_applied(found, line)
        return found

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

    def record_applied(self, applied: Authorised, line: str) -> None:
        """The runtime's own audit record of the calibration it has just put in force."""
        c = applied.calibration
        self.store.audit.append(
            who=self.who, action="runtime.applied", target=f"calibration v{c.version:04d}", old=None,
            new={"version": c.version, "thresholds": {k: r.threshold for k, r in c.recipes.items()},
                 "dry_run": c.dry_run, "line": line}, reason="in force on the running line", result_of=applied.intent_seq)

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
            raise CalibrationError(f"{what}: calibration version {calibration.version} was never recorded in the "
                                   "audit log; restore an audited version with `musc-calibrate rollback`")
        return seqs[-1]
