"""The calibration a line runs with: thresholds per recipe, reject timing, dry-run. Versioned.

``<storage>/calibration/current.json`` is written by ``musc-calibrate`` (atomically, with an audit record)
and read by the runtime at start and on ``apply`` through the control socket. Every ledger row carries
the version it was decided with.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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

    threshold: float = Field(..., description="re-scored score at or above which a part is rejected")


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
