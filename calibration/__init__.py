"""Technician recalibration of a running line: label-free thresholds, shadow tests, versioned calibrations
with rollback, pool management, reject timing (``musc-calibrate``). The calibration files and the audit log
belong to the runtime (``musc_edge.edge.runtime.calibration_state``); this package asks it for every change."""
from __future__ import annotations

from .shadow import ShadowReport, shadow_thresholds
from .thresholds import ThresholdFit, fit_threshold, refine_with_labels

__all__ = ["ShadowReport", "ThresholdFit", "fit_threshold", "refine_with_labels", "shadow_thresholds"]
