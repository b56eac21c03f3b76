"""The calibration in force on a running line, as one immutable object.

The worker reads it once per part (the calibration that decides the part), the output stage writes that same
object's version and dry-run into the part's ledger row and its telemetry event, the reject link shows its
version, and ``status`` reports it. A change replaces the whole object, between two parts, on the worker
thread (``Line._put_in_force``); nothing mirrors its fields elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from .calibration_state import Authorised, Calibration, RejectTiming


@dataclass(frozen=True)
class InForce:
    """An audited calibration (or none: the config's thresholds, version "0") and the dry-run it results in."""

    authorised: Authorised
    dry_run: bool   # the config's line.dry_run or the calibration's own switch

    @classmethod
    def of(cls, authorised: Authorised, config_dry_run: bool) -> InForce:
        calibration = authorised.calibration
        return cls(authorised, bool(config_dry_run or (calibration is not None and calibration.dry_run)))

    @property
    def calibration(self) -> Calibration | None:
        return self.authorised.calibration

    @property
    def version(self) -> str:
        """The version as the ledger, the wire and telemetry carry it ("0": no calibration, the config's)."""
        return "0" if self.calibration is None else str(self.calibration.version)

    @property
    def reject_timing(self) -> RejectTiming | None:
        return None if self.calibration is None else self.calibration.reject_timing
