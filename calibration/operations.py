"""What ``musc-calibrate`` does to a line: gathers the values a decision needs from the line's storage and
control socket, decides (:mod:`musc_edge.calibration.decisions`), and records and delivers changes. No argparse; what a
change is about to do is shown through ``show`` before it is made."""
from __future__ import annotations

import json
from typing import Callable

import numpy as np

from musc_edge.edge.runtime import commands
from musc_edge.edge.runtime.calibration_state import (AuditError, Calibration, CalibrationError, StoreError,
                                                       Verification, parse_calibration)

from . import render
from .client import LineContext, LineNotRunning, UsageError, recent_scored
from .decisions import (Candidate, calibrate, check_delivery, given_threshold, labelled_scores,
                        ledger_calibration_scores, pool_calibration_scores, pool_selection, require_reason,
                        rollback_target, version_creators)
from .roles import technician_token, who

Show = Callable[[str], None]


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
    fit, refinement, chosen = calibrate(scores, target_frr, method, labelled(ctx, good, recipe),
                                        labelled(ctx, bad, recipe))
    return Candidate(recipe, chosen, current, source, described, fit, refinement, scores=scores)


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
