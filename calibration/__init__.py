"""Technician recalibration of a running line: label-free thresholds, shadow tests, versioned calibrations
with rollback, pool management, reject timing and a hash-chained audit log (``musc-calibrate``)."""
from __future__ import annotations

from .audit import AuditLog
from .shadow import ShadowReport, shadow_thresholds
from .store import CalibrationStore
from .thresholds import ThresholdFit, fit_threshold, refine_with_labels

__all__ = ["AuditLog", "CalibrationStore", "ShadowReport", "ThresholdFit", "fit_threshold", "refine_with_labels",
           "shadow_thresholds"]
