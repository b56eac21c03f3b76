"""What ``musc-calibrate`` decides, as functions of plain values (no socket, no argparse, no printing)."""
from __future__ import annotations

import numpy as np

from .client import UsageError
from .thresholds import Refinement, ThresholdFit, fit_threshold, refine_with_labels

CALIBRATION_ACTIONS = ("threshold.apply", "rollback", "timing.set", "timing.dry-run")


def calibrate(scores: np.ndarray, target_frr: float, method: str, good: dict[str, float],
              bad: dict[str, float]) -> tuple[ThresholdFit, Refinement | None, float]:
    """(fit, refinement by confirmed parts or None, the threshold) for a target false-reject rate; a part
    confirmed good or bad on the wrong side moves the threshold past it by a quarter of the model's scale."""
    fit = fit_threshold(scores, target_frr, method)
    if not good and not bad:
        return fit, None, fit.threshold
    margin = fit.scale if fit.scale > 0 else max(float(np.std(scores)), 1e-6)
    refinement = refine_with_labels(fit.threshold, good, bad, 0.25 * margin)
    return fit, refinement, refinement.threshold


def pool_selection(members: list[dict], action: str, recipe: str, part_ids: list[str] | None = None,
                   highest: int | None = None, lowest: int | None = None) -> dict:
    """The members a pool change acts on, as the control request expects them (the line resolves
    ``highest`` / ``lowest`` / ``all`` with :func:`edge_app.runtime.commands.select_members`). Named members
    must be in the pool, and golden ones are never purged."""
    if part_ids:
        known = {m["part_id"] for m in members}
        unknown = [p for p in part_ids if p not in known]
        if unknown:
            raise UsageError(f"not members of pool {recipe!r}: {', '.join(unknown)} (see `pool inspect`)")
        golden = [m["part_id"] for m in members if m["golden"] and m["part_id"] in part_ids]
        if golden and action == "purge":
            raise UsageError(f"golden members are never purged: {', '.join(golden)} (`pool unfreeze` them first)")
        return {"part_ids": part_ids}
    if highest:
        return {"highest": highest}
    if lowest:
        return {"lowest": lowest}
    return {"all": True}


def previous_version(records: list[dict], current: int) -> int | None:
    """The version in force before ``current``, from the last successful change that put ``current`` in force."""
    succeeded = {r["result_of"] for r in records if r.get("result_of") and "ok" in (r.get("new") or {})}
    for record in reversed(records):
        new, old = record.get("new") or {}, record.get("old") or {}
        if (record.get("action") in CALIBRATION_ACTIONS and record.get("seq") in succeeded
                and new.get("version") == current and "version" in old):
            return int(old["version"])
    return None
