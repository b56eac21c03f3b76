"""The calibration a line runs with: thresholds per recipe, reject timing, dry-run. Versioned.

``<storage>/calibration/current.json`` is written by ``musc-calibrate`` (atomically, with an audit record)
and read by the runtime at start and on ``apply`` through the control socket. Every ledger row carries
the version it was decided with.

Authority lives in the runtime (:class:`CalibrationAuthority`): a calibration is put in force only when the
audit chain verifies, its ``vNNNN.json`` holds exactly it, and an audit *intent* record newer than the one
behind the calibration in force authorises it (so a replayed, invented or hand-edited version is refused);
the runtime then writes its own audit record of what it applied.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .verdict import MAX_THRESHOLD


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


def load_current(storage_dir: str | Path, known_recipes: set[str] | None = None) -> Calibration | None:
    """The calibration in force, or None when the line has never been calibrated."""
    path = calibration_dir(storage_dir) / "current.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path} is not valid JSON ({exc}); restore it with `musc-calibrate rollback`") from None
    return parse_calibration(raw, known_recipes, str(path))


@dataclass(frozen=True)
class Authorised:
    """A calibration and the audit intent record (its ``seq``) that put it in force; seq 0 = none (YAML)."""

    calibration: Calibration | None
    intent_seq: int = 0


class CalibrationAuthority:
    """The runtime's own check of what it is asked to run, against the version files and the audit chain."""

    def __init__(self, storage_dir: str | Path, known_recipes: set[str], who: str) -> None:
        from musc_edge.calibration.store import CalibrationStore

        self.store = CalibrationStore(storage_dir)
        self.known_recipes, self.who = known_recipes, who

    def at_start(self, line: str) -> Authorised:
        """The audited calibration in ``current.json`` (none: the YAML thresholds); CalibrationError
        with a one-line reason when ``current.json``, its version file and the audit log disagree, or when
        it is older than what the line last applied (an old version file copied over it). A calibration
        staged since the last run is recorded as applied."""
        from musc_edge.calibration.store import StoreError

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
        from musc_edge.calibration.store import calibration_bytes

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
        from musc_edge.calibration.audit import AuditError
        from musc_edge.calibration.store import file_sha256

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
