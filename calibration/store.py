"""Where a line's calibrations live, and how a change is committed.

``<storage>/calibration/``:
- ``vNNNN.json``: every version ever made, immutable (created exclusively, never rewritten);
- ``current.json``: the version the line runs (or will run at its next start), replaced atomically;
- ``audit.jsonl`` + ``audit.head``: the hash-chained audit log (calibration/audit.py);
- ``.lock``: serialises technicians (flock) so versions and audit records never interleave.

A change is committed as: lock -> write the new ``vNNNN.json`` -> audit intent record -> hand it to the
running line (which swaps it in between two parts and acknowledges the version) -> ``current.json`` ->
audit result record. If the line refuses or is unreachable, ``current.json`` is untouched and the
failure is recorded. Staging (no running line) skips the hand-over: the line loads ``current.json`` at
its next start.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from musc_edge.edge.runtime.calibration_state import Calibration, CalibrationError, calibration_dir, parse_calibration

from .audit import AuditLog, atomic_write

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
