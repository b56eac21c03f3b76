"""What ``musc-calibrate`` does to a line: gathers the values a decision needs from the line's storage and
control socket, decides (:mod:`musc_edge.calibration.decisions`), and records and delivers changes. No argparse; what a
change is about to do is shown through ``show`` before it is made."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from musc_edge.edge.runtime import commands
from musc_edge.edge.runtime.calibration_state import (AuditError, Calibration, CalibrationError, StoreError,
                                                       Verification, parse_calibration)

from . import render
from .client import LineContext, LineNotRunning, UsageError, recent_scored
from .decisions import (Candidate, calibrate, check_assumptions, check_delivery, expected_rates, given_threshold,
                        labelled_scores, ledger_calibration_scores, modelled_rate, pool_calibration_scores,
                        pool_selection, rate_still_holds, require_reason, rollback_target, version_creators)
from .thresholds import ThresholdError
from .roles import technician_token, who

Show = Callable[[str], None]
KEEP_CANDIDATES = 200   # shadow-tested candidates kept per folder


# -- thresholds ------------------------------------------------------------------------------------------------
def calibration_scores(ctx: LineContext, recipe: str, source: str, last: int) -> tuple[np.ndarray, str]:
    """(scores, description): the pool's leave-one-out scores (``source`` "pool") or the recent ledger's."""
    if source == "pool":
        try:
            reply = ctx.request({"cmd": commands.POOL_SCORES, "recipe": recipe})
        except LineNotRunning as exc:
            raise UsageError(f"{exc} (a stopped line can be calibrated from its ledger: --from ledger)") from None
        except UsageError as exc:
            if "PoolTooSmall" not in str(exc):
                raise
            raise UsageError(f"pool {recipe!r} is too small to calibrate from ({exc}); let it fill") from None
        return pool_calibration_scores(np.asarray(reply["scores"], np.float64), recipe)
    with ctx.ledger() as reader:
        rows = recent_scored(reader, recipe, last)
    return ledger_calibration_scores([r.score for r in rows], recipe, last)


def labelled(ctx: LineContext, ids: list[str], recipe: str) -> dict[str, float]:
    """The ledger scores of the parts a person confirmed (good or bad)."""
    if not ids:
        return {}
    with ctx.ledger() as reader:
        found = {pid: reader.find_part(pid) for pid in ids}
    return labelled_scores(found, recipe, ctx.storage / "ledger.sqlite")


def current_threshold(ctx: LineContext, recipe: str) -> float | None:
    """The threshold in force: the running line's, else current.json's, the config's, or the last part's."""
    if ctx.running():
        return float(ctx.status()["recipes"][recipe]["threshold"])
    stored = ctx.store.current(ctx.recipes())
    if stored is not None and recipe in stored.recipes:
        return stored.recipes[recipe].threshold
    if ctx.config is not None:
        return ctx.config.recipes[recipe].threshold
    if ctx.has_ledger():   # a stopped line known only by its storage: the threshold its last part had
        with ctx.ledger() as reader:
            last = recent_scored(reader, recipe, 1000)
        return last[-1].threshold if last else None
    return None


def candidate(ctx: LineContext, recipe: str, *, threshold: float | None, source: str, last: int,
              target_frr: float, method: str, good: list[str], bad: list[str]) -> Candidate:
    """The threshold asked for: ``threshold`` as given, or calibrated for ``target_frr`` from ``source`` and
    refined by the parts confirmed ``good`` / ``bad``."""
    ctx.check_recipe(recipe)
    current = current_threshold(ctx, recipe)
    if threshold is not None:
        return Candidate(recipe, given_threshold(threshold), current, "given")
    scores, described = calibration_scores(ctx, recipe, source, last)
    check_assumptions(scores, current, described)
    fit, refinement, chosen = calibrate(scores, target_frr, method, labelled(ctx, good, recipe),
                                        labelled(ctx, bad, recipe))
    return Candidate(recipe, chosen, current, source, described, fit, refinement, scores=scores)


def version_in_force(ctx: LineContext) -> str:
    """The calibration version the line runs (running) or will run at its next start (current.json)."""
    if ctx.running():
        return str(ctx.status()["calibration_version"])
    stored = ctx.store.current(ctx.recipes())
    return "0" if stored is None else str(stored.version)


# -- candidates: what `shadow` tested is what `apply` puts in force ----------------------------------------------
def candidate_dirs(ctx: LineContext) -> list[Path]:
    """Where candidates are kept: the line's calibration folder, else this user's cache (an operator who
    cannot write the line's folder can still shadow-test)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "musc-calibrate" / "candidates"
    return [ctx.store.dir / "candidates", cache]


def save_candidate(ctx: LineContext, cand: Candidate, last: int) -> tuple[str, Path]:
    """Write a shadow-tested candidate (threshold, how it was found, its modelled rate, the version it was
    tested against); returns (its id, the file)."""
    body = {"recipe": cand.recipe, "threshold": cand.threshold, "current": cand.current, "source": cand.source,
            "described": cand.described, "last": last, "tested_against_version": version_in_force(ctx),
            "modelled_frr": modelled_rate(cand), "line": str(ctx.storage),
            "fit": None if cand.fit is None else {"method": cand.fit.method, "target_frr": cand.fit.target_frr,
                                                  "location": cand.fit.location, "scale": cand.fit.scale},
            "refined": cand.refinement is not None, "tested_at": time.time()}
    ident = "c" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
    data = (json.dumps({"id": ident, **body}, indent=2, sort_keys=True) + "\n").encode()
    problems = []
    for folder in candidate_dirs(ctx):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{ident}.json"
            path.write_bytes(data)
            for old in sorted(folder.glob("c*.json"), key=lambda p: p.stat().st_mtime)[:-KEEP_CANDIDATES]:
                old.unlink(missing_ok=True)   # a line shadow-tests for months: the newest ones are kept
            return ident, path
        except OSError as exc:
            problems.append(f"{folder}: {exc.strerror or exc}")
    raise UsageError(f"the candidate could not be saved ({'; '.join(problems)})")


def load_candidate(ctx: LineContext, ref: str) -> dict:
    """A saved candidate by id (from either candidate folder) or by file path."""
    paths = [Path(ref)] if ref.endswith(".json") or os.sep in ref else \
        [folder / f"{ref}.json" for folder in candidate_dirs(ctx)]
    for path in paths:
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise UsageError(f"candidate {path} cannot be read: {exc}") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("threshold"), (int, float)):
            raise UsageError(f"candidate {path} is not a candidate file written by `threshold shadow`")
        return saved
    raise UsageError(f"no candidate {ref!r} (looked in {', '.join(str(p) for p in paths)}); run `threshold "
                     "shadow` first, it prints the candidate id")


def checked_candidate(ctx: LineContext, saved: dict) -> Candidate:
    """The saved candidate, if it still holds: the same line and calibration version as when it was tested,
    and (for a calibrated one) its modelled false-reject rate on today's scores within a factor of 2 of the
    tested one. UsageError saying what moved otherwise."""
    recipe, threshold = str(saved.get("recipe")), given_threshold(float(saved["threshold"]))
    ctx.check_recipe(recipe)
    if saved.get("line") not in (None, str(ctx.storage)):
        raise UsageError(f"candidate {saved.get('id')} was tested on the line at {saved['line']}, not this one")
    now = version_in_force(ctx)
    if str(saved.get("tested_against_version")) != now:
        raise UsageError(f"candidate {saved.get('id')} was tested against calibration v"
                         f"{saved.get('tested_against_version')}, the line now has v{now}: shadow-test again")
    cand = Candidate(recipe, threshold, current_threshold(ctx, recipe), saved.get("source", "given"),
                     saved.get("described", ""))
    fit = saved.get("fit")
    if fit and saved.get("modelled_frr") is not None:
        scores, described = calibration_scores(ctx, recipe, saved["source"], int(saved.get("last") or 500))
        try:
            fresh = calibrate(scores, fit["target_frr"], fit["method"], {}, {})[0]
        except ThresholdError as exc:
            raise UsageError(f"the scores have moved since candidate {saved.get('id')} was tested and no longer "
                             f"calibrate ({exc}): shadow-test again") from None
        then, rate = float(saved["modelled_frr"]), fresh.false_reject_rate(threshold)
        if not rate_still_holds(then, rate):
            raise UsageError(f"the {'pool' if saved['source'] == 'pool' else 'stream'} has moved since candidate "
                             f"{saved.get('id')} was tested: its modelled false-reject rate was {100 * then:.2f} %, "
                             f"on {described} it is now {100 * rate:.2f} %; shadow-test again")
        cand.fit, cand.scores, cand.described = fresh, scores, described
    return cand


def apply_threshold(ctx: LineContext, cand: Candidate, reason: str | None, stage: bool, show: Show) -> int:
    """Put ``cand``'s threshold in force as a new version (see :func:`change_calibration`)."""
    def edit(raw: dict) -> dict:
        raw["recipes"] = {**raw["recipes"], cand.recipe: {"threshold": float(cand.threshold)}}
        return raw
    return change_calibration(ctx, "threshold.apply", reason, stage, edit, show)


def candidate_table(ctx: LineContext, cand: Candidate, last: int) -> list[tuple[str, str, str]]:
    return expected_rates(cand, ctx.recent_scores(cand.recipe, last))


def current_timing(ctx: LineContext) -> dict | None:
    """The reject timing in force (running line) or staged (current.json); None when none is set."""
    if ctx.running():
        return ctx.status()["reject_timing"]
    stored = ctx.store.current(ctx.recipes())
    return None if stored is None or stored.reject_timing is None else stored.reject_timing.model_dump(mode="json")


def measured_p99_ms(ctx: LineContext, last: int = 500) -> float | None:
    """The line's p99 capture-to-signal latency: the running line's live figure without the look-ahead wait (a
    part waits for later parts only as long as its deadline allows, so a shorter delay shortens the wait), else
    the last ``last`` scored ledger rows' (their totals include the wait: an upper bound); None when nothing was
    measured."""
    if ctx.running():
        stats = ctx.status().get("stats", {})
        latency = stats.get("latency_needed_ms") or stats.get("latency_ms") or {}
        if latency.get("p99") is not None:
            return float(latency["p99"])
    if not ctx.has_ledger():
        return None
    with ctx.ledger() as reader:
        totals = [r.total_s for r in reader.recent(last) if r.total_s is not None and r.score is not None]
    return float(np.percentile(np.asarray(totals) * 1e3, 99)) if totals else None


# -- calibration changes ---------------------------------------------------------------------------------------
def delivery(ctx: LineContext, stage: bool) -> tuple[str, Callable[[dict], dict] | None]:
    """(token, how a calibration reaches the line): live through the socket, or None when staged."""
    check_delivery(stage, ctx.running(), ctx.socket)
    token = technician_token(ctx.storage, create=stage)
    if stage:
        return token, None
    return token, lambda payload: ctx.request({"cmd": commands.APPLY, "calibration": payload}, token=token)


def baseline(ctx: LineContext) -> Calibration:
    """Version 0: the thresholds the line runs before its first calibration (config or running line)."""
    if ctx.config is not None:
        thresholds = {name: r.threshold for name, r in ctx.config.recipes.items()}
    elif ctx.running():
        thresholds = {name: r["threshold"] for name, r in ctx.status()["recipes"].items()}
    else:
        raise UsageError("this line has no calibration yet: give --config LINE.yaml so its recipes are known")
    return Calibration(version=0, recipes={name: {"threshold": t} for name, t in thresholds.items()})


def in_force(ctx: LineContext) -> tuple[Calibration, bool]:
    """The calibration a change builds on, and whether it is the baseline still to be recorded (first change)."""
    current = ctx.store.current(ctx.recipes())
    if current is not None:
        return current, False
    if 0 in ctx.store.versions():
        return ctx.store.load_version(0, ctx.recipes()), False
    return baseline(ctx), True


def change_calibration(ctx: LineContext, action: str, reason: str | None, stage: bool,
                       edit: Callable[[dict], dict], show: Show) -> int:
    """Make, explain, record and put in force a new calibration version: ``edit`` maps the calibration in
    force (as a dict) to the new one. Returns the new version."""
    reason = require_reason(reason)
    check_delivery(stage, ctx.running(), ctx.socket)
    in_force(ctx)   # refuse an invalid current.json (or an unknown baseline) before anything is touched
    _, apply_live = delivery(ctx, stage)
    with ctx.store.lock():
        old, unrecorded_baseline = in_force(ctx)
        raw = edit({**old.model_dump(mode="json"), "version": ctx.store.next_version()})
        try:
            new = parse_calibration(raw, ctx.recipes(), "the new calibration")
        except CalibrationError as exc:
            raise UsageError(str(exc)) from None
        changes = render.describe_change(old.model_dump(mode="json"), new.model_dump(mode="json"))
        if not changes:
            raise UsageError(f"nothing to change: calibration v{old.version} already has these settings")
        show(f"calibration v{old.version} -> v{new.version} ({action}, by {who()}):")
        for line in changes:
            show(f"  {line}")
        if unrecorded_baseline:
            ctx.store.record_baseline(old, who=who())
        reply = ctx.store.commit(new, who=who(), action=action, reason=reason, old=old.model_dump(mode="json"),
                                 apply_live=apply_live, create=True)
    show(render.outcome(new.version, reply))
    return new.version


def rollback(ctx: LineContext, to: int | None, reason: str | None, stage: bool, show: Show) -> int:
    """Put version ``to`` (default: the one before the version in force) back in force; returns it."""
    reason = require_reason(reason)
    _, apply_live = delivery(ctx, stage)
    with ctx.store.lock():
        try:
            old = ctx.store.current(ctx.recipes())
            old_raw = None if old is None else old.model_dump(mode="json")
        except StoreError as exc:   # a hand-edited current.json: rolling back is how it is repaired
            old, old_raw = None, {"invalid": str(exc)}
            show(f"current.json is invalid and will be replaced: {exc}")
        target = rollback_target(to, None if old is None else old.version, ctx.store.audit.records())
        new = ctx.store.load_version(target, ctx.recipes())
        show(f"rollback to v{target} (by {who()}):")
        for line in render.describe_change(old_raw if old is not None else None, new.model_dump(mode="json")):
            show(f"  {line}")
        reply = ctx.store.commit(new, who=who(), action="rollback", reason=reason, old=old_raw,
                                 apply_live=apply_live, create=False)
    show(render.outcome(target, reply))
    return target


def versions(ctx: LineContext) -> list[dict]:
    """Every stored calibration version: who made it, when, why, its settings, whether current / running."""
    store = ctx.store
    running = ctx.status()["calibration_version"] if ctx.running() else None
    try:
        current = store.current()
        current_version = None if current is None else current.version
    except StoreError:
        current_version = None
    created = version_creators(store.audit.records())
    listing = []
    for version in store.versions():
        record = created.get(version, {})
        try:
            settings = store.load_version(version).model_dump(mode="json")
        except StoreError as exc:
            settings = {"invalid": str(exc)}
        listing.append({"version": version, "created": record.get("time"), "who": record.get("who"),
                        "reason": record.get("reason"), "current": version == current_version,
                        "running": str(version) == str(running), "settings": settings})
    return listing


# -- pool and test fire (live only, recorded in the audit log) ---------------------------------------------------
def pool_change(ctx: LineContext, recipe: str, cmd: str, reason: str | None, show: Show, *,
                selection: dict | None = None, extra: dict | None = None) -> dict:
    """Send one pool change to the running line, recorded in the audit log; ``selection`` (part_ids, highest,
    lowest) picks the members a purge / freeze / unfreeze acts on. Returns the line's reply."""
    reason = require_reason(reason)
    ctx.check_recipe(recipe)
    token, _ = delivery(ctx, stage=False)
    members = ctx.request({"cmd": commands.POOL_INSPECT, "recipe": recipe})["members"]
    payload = {"cmd": cmd, "recipe": recipe, **(extra or {})}
    if cmd != commands.POOL_RESEED:
        action = next(name for name, command in commands.POOL_CHANGES.items() if command == cmd)
        payload.update(pool_selection(members, action, recipe, **(selection or {})))
    before = {"size": len(members), "golden": sum(m["golden"] for m in members)}
    show(f"pool {recipe}: {cmd.replace('pool_', '')} "
         + json.dumps({k: v for k, v in payload.items() if k not in ("cmd", "recipe")}))
    with ctx.store.lock():
        _, reply = ctx.store.audit.record_change(
            who=who(), action=f"pool.{cmd.removeprefix('pool_')}", target=f"pool {recipe}", old=before,
            new={k: v for k, v in payload.items() if k != "cmd"}, reason=reason,
            perform=lambda: {k: v for k, v in ctx.request(payload, token=token, timeout=600).items() if k != "ok"})
    return reply


def test_fire(ctx: LineContext, recipe: str, part_id: str, reason: str | None, show: Show) -> dict:
    """Signal REJECT (reason TEST_FIRE) for a marked test part, recorded in the audit log; the line's reply."""
    reason = require_reason(reason)
    ctx.check_recipe(recipe)
    token, _ = delivery(ctx, stage=False)
    show(f"sending REJECT (reason TEST_FIRE) for marked test part {part_id}: the ejector should fire")
    payload = {"cmd": commands.TEST_FIRE, "part_id": part_id, "recipe": recipe}
    with ctx.store.lock():
        _, reply = ctx.store.audit.record_change(
            who=who(), action="timing.test-fire", target=f"part {part_id}", old=None, new=payload, reason=reason,
            perform=lambda: {k: v for k, v in ctx.request(payload, token=token).items() if k != "ok"})
    return reply


def audit_problems(ctx: LineContext) -> tuple[Verification, list[str]]:
    """(the hash chain's verification, every problem with the chain or the calibration files)."""
    result = ctx.store.audit.verify()
    problems = list(result.problems)
    try:
        problems += ctx.store.check_versions(ctx.store.audit.records())
    except AuditError as exc:
        problems.append(str(exc))
    return result, problems
