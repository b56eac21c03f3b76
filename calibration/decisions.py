"""What ``musc-calibrate`` decides, as functions of plain values (no socket, no argparse, no printing)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musc_edge.edge.errors import UsageError
from musc_edge.edge.ledger import LedgerRow
from musc_edge.edge.record import MAX_THRESHOLD
from musc_edge.edge.runtime.calibration_state import CALIBRATION_ACTIONS, version_creators

from .render import pct
from .thresholds import MIN_SCORES, Refinement, ThresholdFit, fit_threshold, refine_with_labels, reject_rate

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
    """A threshold typed by a person: a finite number the line can decide with, refused before anyone is asked
    to confirm it."""
    if not np.isfinite(value):
        raise UsageError(f"--threshold must be a finite number, got {value}")
    if not 0 < value <= MAX_THRESHOLD:
        raise UsageError(f"--threshold must be above 0 and at most {MAX_THRESHOLD:g}, got {value:g}")
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


# -- what a technician tests is what goes live ----------------------------------------------------------------
MOSTLY_GOOD = 0.5          # the label-free estimate assumes at most this share of the stream is defective
RATE_DRIFT = 2.0           # a candidate's modelled false-reject rate may move by at most this factor
LATENCY_MARGIN = (0.2, 10.0)   # a verdict deadline must leave p99 latency + max(20 % of it, 10 ms)


def check_assumptions(scores: np.ndarray, current: float | None, described: str) -> None:
    """Refuse (UsageError, one sentence why) when the label-free estimate's own assumptions fail: too few
    scores, or more than half of them at or above the threshold in force (a stream that is mostly rejected
    is not mostly good parts, and a tail fitted to it accepts nearly everything)."""
    if scores.size < MIN_SCORES:
        raise UsageError(f"{scores.size} scores are too few to estimate a 1 % tail from ({described}); at least "
                         f"{MIN_SCORES} are needed")
    if current is not None:
        above = reject_rate(scores, current)
        if above > MOSTLY_GOOD:
            raise UsageError(f"{100 * above:.0f} % of {described} score at or above the threshold in force "
                             f"({current:.4f}): the label-free estimate assumes mostly good parts, and this stream "
                             "is mostly rejected, so no threshold is suggested (purge or reseed the pool with good "
                             "parts, or give --threshold)")


def modelled_rate(cand: Candidate) -> float | None:
    """The candidate's modelled false-reject rate on good parts (None for a given threshold)."""
    return None if cand.fit is None else cand.fit.false_reject_rate(cand.threshold)


def rate_still_holds(then: float, now: float) -> bool:
    """Whether a modelled false-reject rate of ``now`` is within :data:`RATE_DRIFT` of the tested ``then``
    (both plus 0.01 % so two tiny rates compare as equal)."""
    floor = 1e-4
    return 1 / RATE_DRIFT <= (now + floor) / (then + floor) <= RATE_DRIFT


def merged_timing(delay_ms: float | None, counts: int | None, lead_ms: float | None, current: dict | None) -> dict:
    """The ``reject_timing`` a ``timing set`` asks for: the options given, the rest kept from ``current`` (the
    timing in force); a new mode needs its distance (``--delay-ms`` or ``--counts``)."""
    if delay_ms is not None and counts is not None:
        raise UsageError("give one of --delay-ms (time mode) or --counts (encoder mode), not both")
    current = dict(current or {})
    if delay_ms is None and counts is None:
        if not current:
            raise UsageError("no reject timing is set yet: give --delay-ms (time mode) or --counts (encoder mode)")
        timing = current
    elif delay_ms is not None:
        timing = {"mode": "time", "delay_ms": delay_ms, "counts": None}
    else:
        timing = {"mode": "encoder", "counts": counts, "delay_ms": None}
    lead = lead_ms if lead_ms is not None else current.get("actuator_lead_ms", 0.0)
    return {**timing, "actuator_lead_ms": lead}


def latency_problem(timing: dict, p99_ms: float | None) -> str | None:
    """Why a time-mode reject timing leaves too little time for the measured p99 latency (plus a margin), or
    None when it leaves enough (or nothing was measured, or encoder mode: the belt speed is not known here)."""
    if timing.get("mode") != "time" or p99_ms is None:
        return None
    budget = timing["delay_ms"] - timing.get("actuator_lead_ms", 0.0)
    need = p99_ms + max(LATENCY_MARGIN[0] * p99_ms, LATENCY_MARGIN[1])
    if budget >= need:
        return None
    return (f"a verdict would have {budget:g} ms (delay - lead), but the line's measured p99 latency is "
            f"{p99_ms:.0f} ms (+ margin: {need:.0f} ms needed): most late parts would get NO_VERDICT (deadline) "
            "and the PLC's fail-safe")
