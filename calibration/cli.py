"""``musc-calibrate``: the technician's recalibration tool for a running line.

Reading (open to operators): ``status``, ``threshold suggest|shadow``, ``pool inspect``, ``versions``,
``audit log|verify``. Changing (technician role, a ``--reason``, an audit record first): ``threshold apply``,
``rollback``, ``pool purge|freeze|unfreeze|reseed``, ``timing set|dry-run|test-fire``. Changes go to the
running line, which takes them between two parts; ``--stage`` writes them for the next start instead
(only while the line is stopped). Bad input prints one line and exits 2 with nothing changed.
See docs/calibration.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_app.config import ConfigError, load_config
from edge_app.ledger import LedgerError, LedgerReader, LedgerRow
from edge_app.runtime import commands
from edge_app.runtime.calibration_state import Calibration, CalibrationError, parse_calibration

from .audit import AuditError
from .client import LineContext, LineNotRunning, UsageError
from .decisions import calibrate, pool_selection, previous_version
from .render import age, describe_change, histogram, pct, print_json
from .roles import RoleError, technician_token, who
from .shadow import SCORED, ShadowReport, shadow_thresholds
from .store import StoreError
from .thresholds import METHODS, MIN_SCORES, Refinement, ThresholdError, ThresholdFit, reject_rate

def _context(args) -> LineContext:
    if (args.config is None) == (args.storage is None):
        raise UsageError("give exactly one of --config LINE.yaml or --storage DIR")
    if args.config is not None:
        config = load_config(args.config)
        socket = args.socket or config.control.socket or config.storage.dir / "control.sock"
        return LineContext(config.storage.dir, Path(socket), config)
    return LineContext(args.storage, args.socket or args.storage / "control.sock")


def recent_scored(reader: LedgerReader, recipe: str, last: int) -> list[LedgerRow]:
    """Scored, non-test parts of ``recipe`` among the ``last`` newest ledger rows, oldest first."""
    rows = reader.recent(last)
    return [r for r in reversed(rows) if r.recipe == recipe and r.reason in SCORED and r.score is not None
            and not r.test_part]


def cmd_status(args) -> int:
    ctx = _context(args)
    try:
        status = ctx.status()
    except UsageError as exc:
        raise UsageError(f"{exc} (`musc-edge status` reads the counters of a stopped line)") from None
    scores = {}
    if ctx.has_ledger():
        with ctx.ledger() as reader:
            scores = {name: [r.score for r in recent_scored(reader, name, args.last)] for name in status["recipes"]}
    try:
        stored = ctx.store.current()
        stored_note = None if stored is None else stored.version
    except StoreError as exc:
        stored_note = f"INVALID: {exc}"
    if args.json:
        print_json({**status, "current_json_version": stored_note, "recent_scores": scores})
        return 0
    timing = status["reject_timing"]
    if timing is None:
        timing_text = "line.deadline_ms (no reject timing calibrated)"
    else:
        distance = f"{timing['delay_ms']:g} ms" if timing["mode"] == "time" else f"{timing['counts']} counts"
        timing_text = f"{timing['mode']} mode, {distance}, actuator lead {timing['actuator_lead_ms']:g} ms"
    print(f"line {status['line']}: RUNNING   calibration v{status['calibration_version']}   "
          f"dry-run {'ON (verdicts are logged, NOT signalled)' if status['dry_run'] else 'off'}")
    if stored_note is not None and str(stored_note) != str(status["calibration_version"]):
        print(f"  note: current.json is {stored_note}; the line runs v{status['calibration_version']}")
    print(f"reject timing: {timing_text}")
    stats = status["stats"]
    verdicts = stats["by_verdict"]
    reasons = " ".join(f"{k}={v}" for k, v in sorted(stats["by_reason"].items()))
    print(f"parts {stats['parts']}: OK {verdicts['ACCEPT']}  NG {verdicts['REJECT']}  NO_VERDICT "
          f"{verdicts['NO_VERDICT']}{f' ({reasons})' if reasons else ''}  acked {stats['acked']}   "
          f"queue {status['queue_depth']}")
    latency = stats["latency_ms"]
    if latency:
        print(f"latency ms: min {latency['min']:.0f}  p50 {latency['p50']:.0f}  p99 {latency['p99']:.0f}  "
              f"max {latency['max']:.0f}")
    link = status["link"]
    if link:
        print(f"link: {'up' if link['connected'] else 'DOWN'}  last ack {age(link['last_ack_age_s'])} ago  "
              f"outbox {link['outbox_depth']}  retries {link['retries']}  naks {link['naks']}"
              + (f"  ALARMS: {'; '.join(link['alarms'])}" if link["alarms"] else ""))
    for alarm in stats["alarms"]:
        print(f"alarm: {alarm}")
    for name, recipe in status["recipes"].items():
        pool = recipe["pool"]
        print(f"\nrecipe {name}: threshold {recipe['threshold']:.4f}")
        print(f"  pool {pool['size']}/{pool['capacity']} members (scores from {pool['min_size']}), "
              f"{pool['golden']} golden, newest {age(pool['newest_age_s'])}, oldest {age(pool['oldest_age_s'])}")
        recent = scores.get(name) or []
        if recent:
            above = reject_rate(np.asarray(recent), recipe["threshold"])
            print(f"  last {len(recent)} scored parts: {pct(above).strip()} at or above the threshold")
            print("\n".join(histogram(np.asarray(recent), recipe["threshold"])))
    return 0


# -- thresholds ------------------------------------------------------------------------------------------------
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


def _calibration_scores(ctx: LineContext, args) -> tuple[np.ndarray, str]:
    if args.source == "pool":
        try:
            reply = ctx.request({"cmd": commands.POOL_SCORES, "recipe": args.recipe})
        except LineNotRunning as exc:
            raise UsageError(f"{exc} (a stopped line can be calibrated from its ledger: --from ledger)") from None
        except UsageError as exc:
            if "PoolTooSmall" not in str(exc):
                raise
            raise UsageError(f"pool {args.recipe!r} is too small to calibrate from ({exc}); let it fill") from None
        scores = np.asarray(reply["scores"], np.float64)
        if scores.size < MIN_SCORES:
            raise UsageError(f"pool {args.recipe!r} is too small to calibrate from: {scores.size} members, at least "
                             f"{MIN_SCORES} are needed (let it fill, or use --from ledger --last N)")
        return scores, f"{scores.size} pool members' leave-one-out scores"
    with ctx.ledger() as reader:
        rows = recent_scored(reader, args.recipe, args.last)
    if len(rows) < MIN_SCORES:
        raise UsageError(f"only {len(rows)} scored parts of recipe {args.recipe!r} among the last {args.last} "
                         f"ledger rows; at least {MIN_SCORES} are needed (raise --last or wait)")
    return np.array([r.score for r in rows]), f"the last {len(rows)} scored parts in the ledger"


def _labelled(ctx: LineContext, ids: list[str], recipe: str) -> dict[str, float]:
    if not ids:
        return {}
    with ctx.ledger() as reader:
        found = {pid: reader.find_part(pid) for pid in ids}
    unknown = [pid for pid, rows in found.items() if not rows]
    if unknown:
        raise UsageError(f"unknown part id(s) {', '.join(unknown)}: not in the ledger {ctx.storage / 'ledger.sqlite'}")
    unscored = [pid for pid, rows in found.items() if rows[-1].score is None or rows[-1].recipe != recipe]
    if unscored:
        raise UsageError(f"part(s) {', '.join(unscored)} have no score for recipe {recipe!r} "
                         "(warm-up, error or another recipe)")
    return {pid: float(rows[-1].score) for pid, rows in found.items()}


def _current_threshold(ctx: LineContext, recipe: str) -> float | None:
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


def candidate(ctx: LineContext, args) -> Candidate:
    """The threshold asked for: given (--threshold) or calibrated (--target-frr, refined by --good/--bad)."""
    ctx.check_recipe(args.recipe)
    current = _current_threshold(ctx, args.recipe)
    if args.threshold is not None:
        if not np.isfinite(args.threshold):
            raise UsageError(f"--threshold must be a finite number, got {args.threshold}")
        return Candidate(args.recipe, args.threshold, current, "given")
    scores, described = _calibration_scores(ctx, args)
    good, bad = _labelled(ctx, args.good, args.recipe), _labelled(ctx, args.bad, args.recipe)
    fit, refinement, threshold = calibrate(scores, args.target_frr, args.method, good, bad)
    return Candidate(args.recipe, threshold, current, args.source, described, fit, refinement, scores=scores)


def expected_rates(ctx: LineContext, cand: Candidate, last: int) -> list[tuple[str, str, str]]:
    """(what, at the current threshold, at the candidate) rows of the expected-reject-rate table."""
    rows = []
    if cand.fit is not None:
        now = "-" if cand.current is None else pct(cand.fit.false_reject_rate(cand.current))
        rows.append(("modelled false-reject rate, good parts", now, pct(cand.fit.false_reject_rate(cand.threshold))))
        if cand.source != "ledger":
            now = "-" if cand.current is None else pct(reject_rate(cand.scores, cand.current))
            rows.append(("rejected among the calibration scores", now, pct(reject_rate(cand.scores, cand.threshold))))
    if ctx.has_ledger():
        with ctx.ledger() as reader:
            recent = [r.score for r in recent_scored(reader, cand.recipe, last)]
        if recent:
            now = "-" if cand.current is None else pct(reject_rate(np.asarray(recent), cand.current))
            rows.append((f"rejected among the last {len(recent)} scored parts", now,
                         pct(reject_rate(np.asarray(recent), cand.threshold))))
    return rows


def _print_candidate(ctx: LineContext, cand: Candidate, last: int) -> None:
    current = "none" if cand.current is None else f"{cand.current:.4f}"
    if cand.fit is not None:
        fit = cand.fit
        print(f"recipe {cand.recipe}: calibrated from {cand.described}, method {fit.method}, target false-reject rate "
              f"{100 * fit.target_frr:g} %")
        print(f"  good-part model: location {fit.location:.4f}, scale {fit.scale:.4f}; about "
              f"{100 * fit.outlier_fraction:.1f} % of the scores lie above it (possible defects)")
        if cand.refinement is not None:
            print(f"  confirmed parts: {cand.refinement.explanation}")
    print(f"  threshold {cand.threshold:.4f}   (now {current})")
    table = expected_rates(ctx, cand, last)
    if table:
        print(f"  {'expected':<42} {'now':>9} {'new':>9}")
        for what, now, new in table:
            print(f"  {what:<42} {now:>9} {new:>9}")


def cmd_threshold_suggest(args) -> int:
    ctx = _context(args)
    cand = candidate(ctx, args)
    if args.json:
        print_json({"recipe": cand.recipe, "threshold": cand.threshold, "current": cand.current,
                     "source": cand.source, "described": cand.described, "fit": None if cand.fit is None else {
                         k: v for k, v in asdict(cand.fit).items() if k != "sorted_scores"},
                     "refinement": cand.refinement and asdict(cand.refinement),
                     "expected": expected_rates(ctx, cand, args.last)})
        return 0
    _print_candidate(ctx, cand, args.last)
    print("nothing changed: `threshold shadow` lists the verdicts that would change, `threshold apply` applies it")
    return 0


def _print_shadow(report: ShadowReport, show: int) -> None:
    print(f"  of the last {report.rows} ledger rows, {report.scored} were scored: rejected {report.rejected_now} "
          f"-> {report.rejected_candidate} with the candidate; {report.changed} verdict(s) would change")
    for title, flips in (("ACCEPT -> REJECT", report.newly_rejected), ("REJECT -> ACCEPT", report.newly_accepted)):
        for flip in flips[:show]:
            print(f"    {title}  {flip.part_id:<24} score {flip.score:.4f}  (threshold {flip.old_threshold:.4f} -> "
                  f"{flip.new_threshold:.4f})  {flip.source_ref or ''}")
        if len(flips) > show:
            print(f"    ... and {len(flips) - show} more {title}")


def cmd_threshold_shadow(args) -> int:
    ctx = _context(args)
    cand = candidate(ctx, args)
    with ctx.ledger() as reader:
        report = shadow_thresholds(list(reversed(reader.recent(args.last))), {cand.recipe: cand.threshold})
    if args.json:
        print_json({"recipe": cand.recipe, "threshold": cand.threshold, "current": cand.current,
                     "report": asdict(report)})
        return 0
    _print_candidate(ctx, cand, args.last)
    _print_shadow(report, args.show)
    print("nothing changed: apply it with `threshold apply ... --reason \"...\"`")
    return 0


# -- changes ---------------------------------------------------------------------------------------------------
def _require_reason(args) -> str:
    if not args.reason or not args.reason.strip():
        raise UsageError("a change needs --reason \"...\" (it goes into the audit log)")
    return args.reason.strip()


def _check_running(ctx: LineContext, stage: bool) -> None:
    """A live change needs a running line; a staged one (--stage) a stopped line."""
    running = ctx.running()
    if stage and running:
        raise UsageError(f"the line is running (socket {ctx.socket}): apply the change live, without --stage")
    if not stage and not running:
        raise UsageError(f"no running line answers on {ctx.socket}: start it, or add --stage to write the change "
                         "to current.json for its next start")


def _delivery(ctx: LineContext, stage: bool) -> tuple[str, Callable[[dict], dict] | None]:
    """(token, how a calibration reaches the line): live through the socket, or None when staged."""
    _check_running(ctx, stage)
    token = technician_token(ctx.storage, create=stage)
    if stage:
        return token, None
    return token, lambda payload: ctx.request({"cmd": commands.APPLY, "calibration": payload}, token=token)


def _baseline(ctx: LineContext) -> Calibration:
    """Version 0: the thresholds the line runs before its first calibration (config or running line)."""
    if ctx.config is not None:
        thresholds = {name: r.threshold for name, r in ctx.config.recipes.items()}
    elif ctx.running():
        thresholds = {name: r["threshold"] for name, r in ctx.status()["recipes"].items()}
    else:
        raise UsageError("this line has no calibration yet: give --config LINE.yaml so its recipes are known")
    return Calibration(version=0, recipes={name: {"threshold": t} for name, t in thresholds.items()})


def _in_force(ctx: LineContext) -> tuple[Calibration, bool]:
    """The calibration a change builds on, and whether it is the baseline still to be recorded (first change)."""
    current = ctx.store.current(ctx.recipes())
    if current is not None:
        return current, False
    if 0 in ctx.store.versions():
        return ctx.store.load_version(0, ctx.recipes()), False
    return _baseline(ctx), True


def change_calibration(ctx: LineContext, args, action: str, edit: Callable[[dict], dict]) -> int:
    """Make, explain, record and put in force a new calibration version: ``edit`` maps the calibration in
    force (as a dict) to the new one."""
    reason = _require_reason(args)
    _check_running(ctx, args.stage)
    _in_force(ctx)   # refuse an invalid current.json (or an unknown baseline) before anything is touched
    _, apply_live = _delivery(ctx, args.stage)
    with ctx.store.lock():
        old, unrecorded_baseline = _in_force(ctx)
        raw = edit({**old.model_dump(mode="json"), "version": ctx.store.next_version()})
        try:
            new = parse_calibration(raw, ctx.recipes(), "the new calibration")
        except CalibrationError as exc:
            raise UsageError(str(exc)) from None
        changes = describe_change(old.model_dump(mode="json"), new.model_dump(mode="json"))
        if not changes:
            raise UsageError(f"nothing to change: calibration v{old.version} already has these settings")
        print(f"calibration v{old.version} -> v{new.version} ({action}, by {who()}):")
        for line in changes:
            print(f"  {line}")
        if unrecorded_baseline:
            ctx.store.record_baseline(old, who=who())
        reply = ctx.store.commit(new, who=who(), action=action, reason=reason, old=old.model_dump(mode="json"),
                                 apply_live=apply_live, create=True)
    _print_outcome(new.version, reply)
    return 0


def _print_outcome(version: int, reply: dict) -> None:
    if reply.get("staged"):
        print(f"staged: current.json is now v{version}; the line takes it at its next start")
    else:
        print(f"in force: the line switched to v{version} between two parts and acknowledged it")


def cmd_threshold_apply(args) -> int:
    ctx = _context(args)
    cand = candidate(ctx, args)
    _print_candidate(ctx, cand, args.last)

    def edit(raw: dict) -> dict:
        raw["recipes"] = {**raw["recipes"], cand.recipe: {"threshold": float(cand.threshold)}}
        return raw
    return change_calibration(ctx, args, "threshold.apply", edit)


def cmd_rollback(args) -> int:
    ctx = _context(args)
    reason = _require_reason(args)
    _, apply_live = _delivery(ctx, args.stage)
    with ctx.store.lock():
        try:
            old = ctx.store.current(ctx.recipes())
            old_raw = None if old is None else old.model_dump(mode="json")
        except StoreError as exc:   # a hand-edited current.json: rolling back is how it is repaired
            old, old_raw = None, {"invalid": str(exc)}
            print(f"current.json is invalid and will be replaced: {exc}")
        target = args.to
        if target is None:
            if old is None:
                raise UsageError("give --to N: the version in force is unknown")
            target = previous_version(ctx.store.audit.records(), old.version)
            if target is None:
                raise UsageError(f"no earlier version is recorded before v{old.version}; give --to N")
        if old is not None and target == old.version:
            raise UsageError(f"version {target} is already in force")
        new = ctx.store.load_version(target, ctx.recipes())
        print(f"rollback to v{target} (by {who()}):")
        for line in describe_change(old_raw if old is not None else None, new.model_dump(mode="json")):
            print(f"  {line}")
        reply = ctx.store.commit(new, who=who(), action="rollback", reason=reason, old=old_raw,
                                 apply_live=apply_live, create=False)
    _print_outcome(target, reply)
    return 0


def cmd_versions(args) -> int:
    ctx = _context(args)
    store = ctx.store
    running = ctx.status()["calibration_version"] if ctx.running() else None
    try:
        current = store.current()
        current_version = None if current is None else current.version
    except StoreError:
        current_version = None
    created: dict[int, dict] = {}   # version -> the audit record that created it (rollbacks name it again)
    for record in store.audit.records():
        new = record.get("new")
        if record.get("result_of") is None and isinstance(new, dict) and "file_sha256" in new:
            created.setdefault(new.get("version"), record)
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
    if args.json:
        print_json(listing)
        return 0
    if not listing:
        print("no calibration versions yet: the line runs the thresholds of its config")
    for item in listing:
        flags = " ".join(f for f, on in (("[current.json]", item["current"]), ("[running]", item["running"])) if on)
        thresholds = ", ".join(f"{k} {v['threshold']:.4f}" for k, v in item["settings"].get("recipes", {}).items())
        print(f"v{item['version']:04d}  {item['created'] or '-':<24} {item['who'] or '-':<20} {thresholds}  {flags}")
        if item["reason"]:
            print(f"       {item['reason']}")
    return 0


# -- pool ------------------------------------------------------------------------------------------------------
def cmd_pool_inspect(args) -> int:
    ctx = _context(args)
    ctx.check_recipe(args.recipe)
    members = ctx.request({"cmd": commands.POOL_INSPECT, "recipe": args.recipe})["members"]
    loo = None
    if len(members) >= 3:
        loo = ctx.request({"cmd": commands.POOL_SCORES, "recipe": args.recipe})["scores"]
    if args.json:
        print_json({"recipe": args.recipe, "members": members, "leave_one_out_scores": loo})
        return 0
    now = time.time()
    recipe = ctx.status()["recipes"][args.recipe]
    print(f"pool {args.recipe}: {len(members)}/{recipe['pool']['capacity']} members, "
          f"{sum(m['golden'] for m in members)} golden, threshold {recipe['threshold']:.4f}")
    print(f"  {'slot':>4}  {'part id':<28} {'age':>9} {'raw score':>10} {'score (loo)':>12}  golden")
    for i, member in enumerate(members):
        score = "-" if loo is None else f"{loo[i]:.4f}"
        print(f"  {member['slot']:>4}  {member['part_id']:<28} {age(now - member['admitted_time']):>9} "
              f"{member['raw_score']:>10.4f} {score:>12}  {'yes' if member['golden'] else ''}")
    return 0


def _pool_change(ctx: LineContext, args, cmd: str, extra: dict) -> dict:
    reason = _require_reason(args)
    ctx.check_recipe(args.recipe)
    token, _ = _delivery(ctx, stage=False)
    members = ctx.request({"cmd": commands.POOL_INSPECT, "recipe": args.recipe})["members"]
    payload = {"cmd": cmd, "recipe": args.recipe, **extra}
    if cmd != commands.POOL_RESEED:
        payload.update(pool_selection(members, args.pool_action, args.recipe, args.part_ids,
                                      getattr(args, "highest", None), getattr(args, "lowest", None)))
    before = {"size": len(members), "golden": sum(m["golden"] for m in members)}
    print(f"pool {args.recipe}: {cmd.replace('pool_', '')} "
          + json.dumps({k: v for k, v in payload.items() if k not in ("cmd", "recipe")}))
    with ctx.store.lock():
        _, reply = ctx.store.audit.record_change(
            who=who(), action=f"pool.{cmd.removeprefix('pool_')}", target=f"pool {args.recipe}", old=before,
            new={k: v for k, v in payload.items() if k != "cmd"}, reason=reason,
            perform=lambda: {k: v for k, v in ctx.request(payload, token=token, timeout=600).items() if k != "ok"})
    return reply


def cmd_pool_change(args) -> int:
    ctx = _context(args)
    cmd = commands.POOL_CHANGES[args.pool_action]
    reply = _pool_change(ctx, args, cmd, {})
    print(f"done: {reply['changed']} member(s) changed; pool now {reply['size']} members, {reply['golden']} golden")
    capacity = ctx.status()["recipes"][args.recipe]["pool"]["capacity"]
    if reply["golden"] >= capacity:
        print("note: the pool is full of golden members, so it takes in no new parts until some are unfrozen")
    return 0


def cmd_pool_reseed(args) -> int:
    ctx = _context(args)
    folder = args.folder.resolve()
    if not folder.is_dir():
        raise UsageError(f"reseed folder not found: {folder}")
    print("every non-golden member is replaced by the folder's images (golden members stay)")
    reply = _pool_change(ctx, args, commands.POOL_RESEED, {"folder": str(folder)})
    print(f"done: pool now {reply['size']} members")
    return 0


# -- reject timing ---------------------------------------------------------------------------------------------
def cmd_timing_set(args) -> int:
    ctx = _context(args)
    if (args.delay_ms is None) == (args.counts is None):
        raise UsageError("give exactly one of --delay-ms (time mode) or --counts (encoder mode)")
    timing = {"mode": "time", "delay_ms": args.delay_ms} if args.delay_ms is not None else \
        {"mode": "encoder", "counts": args.counts}
    timing["actuator_lead_ms"] = args.lead_ms
    print("each part's verdict deadline becomes capture + camera-to-ejector delay - actuator lead; a verdict "
          "later than that is not signalled and the PLC's fail-safe applies")
    return change_calibration(ctx, args, "timing.set", lambda raw: {**raw, "reject_timing": timing})


def cmd_timing_dry_run(args) -> int:
    ctx = _context(args)
    on = args.state == "on"
    if on:
        print("dry-run ON: verdicts are recorded in the ledger but NOT sent to the PLC; unless the PLC bypasses "
              "inspection, its inspect window then rejects every part")
    else:
        print("dry-run off: verdicts are signalled to the PLC again")
    code = change_calibration(ctx, args, "timing.dry-run", lambda raw: {**raw, "dry_run": on})
    if not on and not args.stage and ctx.request({"cmd": commands.STATUS})["dry_run"]:
        print("warning: the line still runs dry because its config sets line.dry_run: true")
    return code


def cmd_timing_test_fire(args) -> int:
    ctx = _context(args)
    reason = _require_reason(args)
    ctx.check_recipe(args.recipe)
    token, _ = _delivery(ctx, stage=False)
    part_id = args.part_id or f"TEST-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"sending REJECT (reason TEST_FIRE) for marked test part {part_id}: the ejector should fire")
    payload = {"cmd": commands.TEST_FIRE, "part_id": part_id, "recipe": args.recipe}
    with ctx.store.lock():
        _, reply = ctx.store.audit.record_change(
            who=who(), action="timing.test-fire", target=f"part {part_id}", old=None, new=payload, reason=reason,
            perform=lambda: {k: v for k, v in ctx.request(payload, token=token).items() if k != "ok"})
    print(f"signalled as seq {reply['seq']}; PLC {'acknowledged' if reply['acked'] else 'did NOT acknowledge'} it")
    return 0 if reply["acked"] else 1


# -- audit -----------------------------------------------------------------------------------------------------
def _summary(record: dict) -> str:
    if record.get("result_of") is not None:
        new = record.get("new") or {}
        outcome = "ok" if "ok" in new else f"FAILED: {new.get('failed')}"
        return f"#{record['seq']:<4} {record['time']}  result of #{record['result_of']}: {outcome}"
    head = (f"#{record['seq']:<4} {record['time']}  {record['who']}  {record['action']}  {record['target']}  "
            f"reason: {record['reason']}")
    old, new = record.get("old"), record.get("new")
    if isinstance(new, dict) and "file_sha256" in new:
        lines = describe_change(old if isinstance(old, dict) else None, new)
        return head + "".join(f"\n        {line}" for line in lines)
    return head + f"\n        {json.dumps(old)} -> {json.dumps(new)}"


def cmd_audit_log(args) -> int:
    ctx = _context(args)
    records = ctx.store.audit.records()[-args.last:]
    if args.json:
        print_json(records)
        return 0
    if not records:
        print("the audit log is empty: nothing has been changed on this line")
    for record in records:
        print(_summary(record))
    return 0


def cmd_audit_verify(args) -> int:
    ctx = _context(args)
    result = ctx.store.audit.verify()
    problems = list(result.problems)
    try:
        problems += ctx.store.check_versions(ctx.store.audit.records())
    except AuditError as exc:
        problems.append(str(exc))
    if args.json:
        print_json({"ok": not problems, "records": result.records, "head_sha256": result.head_sha256,
                     "problems": problems})
    elif problems:
        print(f"audit log {ctx.store.audit.path}: FAILED verification")
        for problem in problems:
            print(f"  {problem}")
    else:
        print(f"audit log {ctx.store.audit.path}: OK, {result.records} records, chain intact, every calibration "
              f"version accounted for; head sha256 {result.head_sha256}")
    return 1 if problems else 0


# -- argument parsing ------------------------------------------------------------------------------------------
def _ids(text: str) -> list[str]:
    ids = [p.strip() for p in text.split(",") if p.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected comma-separated part ids")
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate such as 0.01, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), e.g. 0.01 for 1 %; got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser, json_flag: bool = False) -> None:
    where = p.add_argument_group("which line")
    where.add_argument("--config", type=Path, help="the line config (YAML); its storage.dir holds everything")
    where.add_argument("--storage", type=Path, help="the line's storage folder (instead of --config)")
    where.add_argument("--socket", type=Path,
                       help="control socket (default: from the config, or <storage>/control.sock)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON")


def _change_flags(p: argparse.ArgumentParser, stage: bool) -> None:
    p.add_argument("--reason", required=True, help="why (recorded in the audit log; required)")
    if stage:
        p.add_argument("--stage", action="store_true",
                       help="the line is stopped: write current.json for its next start instead of applying live")


def _threshold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="default")
    p.add_argument("--threshold", type=float, help="use this threshold instead of calibrating one")
    p.add_argument("--target-frr", type=_rate, default=0.01,
                   help="target false-reject rate on good parts (default 0.01)")
    p.add_argument("--from", dest="source", choices=("pool", "ledger"), default="pool",
                   help="calibrate from the pool's leave-one-out scores (default) or the last --last ledger parts")
    p.add_argument("--last", type=_positive_int, default=500, help="ledger parts to calibrate from / report on")
    p.add_argument("--method", choices=METHODS, default="gumbel", help="threshold method (default gumbel)")
    p.add_argument("--good", type=_ids, default=[], help="part ids confirmed good (comma-separated)")
    p.add_argument("--bad", type=_ids, default=[], help="part ids confirmed bad (comma-separated)")


def _pool_selection(p: argparse.ArgumentParser, extreme: str) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--part-ids", type=_ids, help="these members (comma-separated)")
    which.add_argument(f"--{extreme}", type=_positive_int, help=f"the N members with the {extreme} raw scores")
    which.add_argument("--all", action="store_true", help="every member (golden members are kept by purge)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="musc-calibrate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("status", help="a running line: calibration, pools, counters, link, recent scores")
    _common(p, json_flag=True)
    p.add_argument("--last", type=_positive_int, default=200, help="ledger parts in the score histogram")
    p.set_defaults(func=cmd_status)

    threshold = sub.add_parser("threshold", help="suggest, shadow-test or apply a threshold").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    for name, func, help_text in (
            ("suggest", cmd_threshold_suggest, "calibrate a threshold for a target false-reject rate (no change)"),
            ("shadow", cmd_threshold_shadow, "which recent verdicts a candidate threshold would change (no change)"),
            ("apply", cmd_threshold_apply, "put a threshold in force (technician)")):
        p = threshold.add_parser(name, help=help_text)
        _common(p, json_flag=name != "apply")
        _threshold_options(p)
        if name == "shadow":
            p.add_argument("--show", type=_positive_int, default=20, help="changed parts listed per direction")
        if name == "apply":
            _change_flags(p, stage=True)
        p.set_defaults(func=func)

    p = sub.add_parser("rollback", help="put an earlier calibration version back in force (technician)")
    _common(p)
    p.add_argument("--to", type=int, help="version number (default: the one in force before the current one)")
    _change_flags(p, stage=True)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("versions", help="every stored calibration version")
    _common(p, json_flag=True)
    p.set_defaults(func=cmd_versions)

    pool = sub.add_parser("pool", help="inspect or change a recipe's reference pool").add_subparsers(
        dest="pool_action", required=True, parser_class=_Parser)
    p = pool.add_parser("inspect", help="members, ages and scores")
    _common(p, json_flag=True)
    p.add_argument("--recipe", default="default")
    p.set_defaults(func=cmd_pool_inspect)
    for name, extreme, help_text in (("purge", "highest", "remove members (golden ones are kept)"),
                                     ("freeze", "lowest", "make members golden: never evicted"),
                                     ("unfreeze", "lowest", "make golden members ordinary again")):
        p = pool.add_parser(name, help=help_text + " (technician)")
        _common(p)
        p.add_argument("--recipe", default="default")
        _pool_selection(p, extreme)
        _change_flags(p, stage=False)
        p.set_defaults(func=cmd_pool_change)
    p = pool.add_parser("reseed", help="replace the non-golden members by a folder of good captures (technician)")
    _common(p)
    p.add_argument("--recipe", default="default")
    p.add_argument("--folder", type=Path, required=True)
    _change_flags(p, stage=False)
    p.set_defaults(func=cmd_pool_reseed)

    timing = sub.add_parser("timing", help="reject timing, dry-run, test fire").add_subparsers(
        dest="timing_action", required=True, parser_class=_Parser)
    p = timing.add_parser("set", help="camera-to-ejector delay in ms or encoder counts (technician)")
    _common(p)
    p.add_argument("--delay-ms", type=float, help="time mode: capture -> ejector, milliseconds")
    p.add_argument("--counts", type=int, help="encoder mode: encoder counts capture -> ejector")
    p.add_argument("--lead-ms", type=float, default=0.0, help="the ejector needs the verdict this much earlier")
    _change_flags(p, stage=True)
    p.set_defaults(func=cmd_timing_set)
    p = timing.add_parser("dry-run", help="log verdicts without signalling them (on) or signal again (off)")
    _common(p)
    p.add_argument("state", choices=("on", "off"))
    _change_flags(p, stage=True)
    p.set_defaults(func=cmd_timing_dry_run)
    p = timing.add_parser("test-fire", help="send a REJECT for a marked test part (technician)")
    _common(p)
    p.add_argument("--part-id", help="the test part's id (default TEST-<time>)")
    p.add_argument("--recipe", default="default")
    _change_flags(p, stage=False)
    p.set_defaults(func=cmd_timing_test_fire)

    audit = sub.add_parser("audit", help="the change log").add_subparsers(dest="audit_action", required=True,
                                                                          parser_class=_Parser)
    p = audit.add_parser("log", help="recent changes: who, when, what, old -> new, why")
    _common(p, json_flag=True)
    p.add_argument("--last", type=_positive_int, default=50)
    p.set_defaults(func=cmd_audit_log)
    p = audit.add_parser("verify", help="check the hash chain and the calibration files (exit 1 if tampered)")
    _common(p, json_flag=True)
    p.set_defaults(func=cmd_audit_verify)
    return parser


ERRORS = (UsageError, ConfigError, CalibrationError, StoreError, ThresholdError, RoleError, AuditError, LedgerError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except ERRORS as exc:
        message = " ".join(str(exc).split())
        print(f"musc-calibrate {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
