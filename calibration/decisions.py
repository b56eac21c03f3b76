"""What ``musc-calibrate`` decides, as functions of plain values (no socket, no argparse, no printing)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musc_edge.edge.errors import UsageError
from musc_edge.edge.ledger import LedgerRow

from .render import pct
from .thresholds import MIN_SCORES, Refinement, ThresholdFit, fit_threshold, refine_with_labels, reject_rate

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
    ``highest`` / ``lowest`` / ``all`` with :func:`musc_edge.edge.runtime.commands.select_members`). Named members
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


@dataclass
class Candidate:
    """A threshold for one recipe, and how it was found."""

    recipe: str
    threshold: float
    current: float | None
    source: str                         # "given", "pool" or "ledger"
    described: str = ""                 # where the calibration scores came from, for people
    fit: ThresholdFit | None = None
    refinement: Refinement | None = None
    scores: np.ndarray | None = None


def require_reason(reason: str | None) -> str:
    """The stripped ``--reason`` of a change (every change is recorded with one)."""
    if not reason or not reason.strip():
        raise UsageError("a change needs --reason \"...\" (it goes into the audit log)")
    return reason.strip()


def check_delivery(stage: bool, running: bool, socket: Path) -> None:
    """A live change needs a running line; a staged one (``--stage``) a stopped line."""
    if stage and running:
        raise UsageError(f"the line is running (socket {socket}): apply the change live, without --stage")
    if not stage and not running:
        raise UsageError(f"no running line answers on {socket}: start it, or add --stage to write the change "
                         "to current.json for its next start")


def given_threshold(value: float) -> float:
    """A threshold typed by a person: any finite number."""
    if not np.isfinite(value):
        raise UsageError(f"--threshold must be a finite number, got {value}")
    return value


def pool_calibration_scores(scores: np.ndarray, recipe: str) -> tuple[np.ndarray, str]:
    """(scores, description) from a pool's leave-one-out scores, refused when too few to calibrate from."""
    if scores.size < MIN_SCORES:
        raise UsageError(f"pool {recipe!r} is too small to calibrate from: {scores.size} members, at least "
                         f"{MIN_SCORES} are needed (let it fill, or use --from ledger --last N)")
    return scores, f"{scores.size} pool members' leave-one-out scores"


def ledger_calibration_scores(scores: list[float], recipe: str, last: int) -> tuple[np.ndarray, str]:
    """(scores, description) from the recent ledger, refused when too few to calibrate from."""
    if len(scores) < MIN_SCORES:
        raise UsageError(f"only {len(scores)} scored parts of recipe {recipe!r} among the last {last} "
                         f"ledger rows; at least {MIN_SCORES} are needed (raise --last or wait)")
    return np.array(scores), f"the last {len(scores)} scored parts in the ledger"


def labelled_scores(found: dict[str, list[LedgerRow]], recipe: str, ledger: Path) -> dict[str, float]:
    """The scores of parts a person confirmed good or bad, from their ledger rows (newest last); every part
    must be in the ledger with a score for ``recipe``."""
    unknown = [pid for pid, rows in found.items() if not rows]
    if unknown:
        raise UsageError(f"unknown part id(s) {', '.join(unknown)}: not in the ledger {ledger}")
    unscored = [pid for pid, rows in found.items() if rows[-1].score is None or rows[-1].recipe != recipe]
    if unscored:
        raise UsageError(f"part(s) {', '.join(unscored)} have no score for recipe {recipe!r} "
                         "(warm-up, error or another recipe)")
    return {pid: float(rows[-1].score) for pid, rows in found.items()}


def expected_rates(cand: Candidate, recent: list[float]) -> list[tuple[str, str, str]]:
    """(what, at the current threshold, at the candidate) rows of the expected-reject-rate table; ``recent``
    are the scores of the last scored parts in the ledger."""
    rows = []
    if cand.fit is not None:
        now = "-" if cand.current is None else pct(cand.fit.false_reject_rate(cand.current))
        rows.append(("modelled false-reject rate, good parts", now, pct(cand.fit.false_reject_rate(cand.threshold))))
        if cand.source != "ledger":
            now = "-" if cand.current is None else pct(reject_rate(cand.scores, cand.current))
            rows.append(("rejected among the calibration scores", now, pct(reject_rate(cand.scores, cand.threshold))))
    if recent:
        now = "-" if cand.current is None else pct(reject_rate(np.asarray(recent), cand.current))
        rows.append((f"rejected among the last {len(recent)} scored parts", now,
                     pct(reject_rate(np.asarray(recent), cand.threshold))))
    return rows


def reject_timing(delay_ms: float | None, counts: int | None, lead_ms: float) -> dict:
    """The ``reject_timing`` setting: time mode (``delay_ms``) or encoder mode (``counts``), exactly one."""
    if (delay_ms is None) == (counts is None):
        raise UsageError("give exactly one of --delay-ms (time mode) or --counts (encoder mode)")
    timing: dict = {"mode": "time", "delay_ms": delay_ms} if delay_ms is not None else \
        {"mode": "encoder", "counts": counts}
    timing["actuator_lead_ms"] = lead_ms
    return timing


def rollback_target(requested: int | None, in_force: int | None, records: list[dict]) -> int:
    """The version a rollback puts in force: ``requested``, else the one before the version in force."""
    target = requested
    if target is None:
        if in_force is None:
            raise UsageError("give --to N: the version in force is unknown")
        target = previous_version(records, in_force)
        if target is None:
            raise UsageError(f"no earlier version is recorded before v{in_force}; give --to N")
    if in_force is not None and target == in_force:
        raise UsageError(f"version {target} is already in force")
    return target


def version_creators(records: list[dict]) -> dict[int, dict]:
    """version -> the audit record that created it (rollbacks name a version again; the first one counts)."""
    created: dict[int, dict] = {}
    for record in records:
        new = record.get("new")
        if record.get("result_of") is None and isinstance(new, dict) and "file_sha256" in new:
            created.setdefault(new.get("version"), record)
    return created
