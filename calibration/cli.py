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
import sys
import time
from dataclasses import asdict
from pathlib import Path

from musc_edge.edge.config import ConfigError
from musc_edge.edge.ledger import LedgerError
from musc_edge.edge.runtime import commands
from musc_edge.edge.runtime.calibration_state import AuditError, CalibrationError, StoreError

from . import operations, render
from .client import LineContext, UsageError
from .decisions import (Candidate, check_delivery, expected_rates, latency_problem, merged_timing,
                        require_reason)
from .render import print_json
from .roles import RoleError
from .shadow import shadow_thresholds
from .thresholds import METHODS, ThresholdError


def _context(args) -> LineContext:
    return LineContext.open(args.config, args.storage, args.socket)


def _say(lines: list[str]) -> None:
    for line in lines:
        print(line)


# -- reading ---------------------------------------------------------------------------------------------------
def cmd_status(args) -> int:
    ctx = _context(args)
    try:
        status = ctx.status()
    except UsageError as exc:
        raise UsageError(f"{exc} (`musc-edge status` reads the counters of a stopped line)") from None
    scores = {name: ctx.recent_scores(name, args.last) for name in status["recipes"]} if ctx.has_ledger() else {}
    try:
        stored = ctx.store.current()
        stored_note = None if stored is None else stored.version
    except StoreError as exc:
        stored_note = f"INVALID: {exc}"
    if args.json:
        print_json({**status, "current_json_version": stored_note, "recent_scores": scores})
    else:
        _say(render.status(status, stored_note, scores))
    return 0


def _candidate(ctx: LineContext, args) -> Candidate:
    return operations.candidate(ctx, args.recipe, threshold=args.threshold, source=args.source, last=args.last,
                                target_frr=args.target_frr, method=args.method, good=args.good, bad=args.bad)


def cmd_threshold_suggest(args) -> int:
    ctx = _context(args)
    cand = _candidate(ctx, args)
    table = expected_rates(cand, ctx.recent_scores(cand.recipe, args.last))
    if args.json:
        print_json(render.candidate_json(cand, table))
        return 0
    _say(render.candidate(cand, table))
    print("nothing changed: `threshold shadow` lists the verdicts that would change, `threshold apply` applies it")
    return 0


def cmd_threshold_shadow(args) -> int:
    ctx = _context(args)
    cand = _candidate(ctx, args)
    baseline = {} if cand.current is None else {cand.recipe: cand.current}   # in force, or staged (--stage)
    with ctx.ledger() as reader:
        report = shadow_thresholds(list(reversed(reader.recent(args.last))), {cand.recipe: cand.threshold},
                                   baseline)
    ident, path = operations.save_candidate(ctx, cand, args.last)
    if args.json:
        print_json({"candidate": ident, "candidate_file": str(path), "recipe": cand.recipe,
                    "threshold": cand.threshold, "current": cand.current, "report": asdict(report)})
        return 0
    _say(render.candidate(cand, operations.candidate_table(ctx, cand, args.last)))
    _say(render.shadow(report, args.show))
    print(f"candidate {ident} (threshold {cand.threshold:.4f}) saved to {path}")
    print(f"nothing changed: apply exactly this with `threshold apply --candidate {ident} --reason \"...\"`")
    return 0


def cmd_versions(args) -> int:
    listing = operations.versions(_context(args))
    if args.json:
        print_json(listing)
    else:
        _say(render.versions(listing))
    return 0


def cmd_pool_inspect(args) -> int:
    ctx = _context(args)
    ctx.check_recipe(args.recipe)
    members = ctx.request({"cmd": commands.POOL_INSPECT, "recipe": args.recipe})["members"]
    loo = None
    if len(members) >= 3:
        loo = ctx.request({"cmd": commands.POOL_SCORES, "recipe": args.recipe})["scores"]
    if args.json:
        print_json({"recipe": args.recipe, "members": members, "leave_one_out_scores": loo})
    else:
        _say(render.pool(args.recipe, members, loo, ctx.status()["recipes"][args.recipe], time.time()))
    return 0


def cmd_audit_log(args) -> int:
    records = _context(args).store.audit.records()[-args.last:]
    if args.json:
        print_json(records)
        return 0
    if not records:
        print("the audit log is empty: nothing has been changed on this line")
    _say([render.audit_record(record) for record in records])
    return 0


def cmd_audit_verify(args) -> int:
    ctx = _context(args)
    result, problems = operations.audit_problems(ctx)
    if args.json:
        print_json({"ok": not problems, "records": result.records, "head_sha256": result.head_sha256,
                    "signatures_checked": result.keyed, "pending": result.pending, "problems": problems})
    elif problems:
        print(f"audit log {ctx.store.audit.path}: FAILED verification")
        _say([f"  {problem}" for problem in problems])
    else:
        macs = "every record signed with the line's device secret" if result.keyed else \
            "record signatures NOT checked (this user cannot read the device secret; the runtime checks them)"
        print(f"audit log {ctx.store.audit.path}: OK, {result.records} records, chain intact, {macs}, every "
              f"calibration version accounted for; head sha256 {result.head_sha256}")
    if result.pending:
        print(f"note: a change cut off by a kill left {' and '.join(result.pending)} to complete; the next change "
              "or start completes it")
    return 1 if problems else 0


# -- changing --------------------------------------------------------------------------------------------------
def cmd_threshold_apply(args) -> int:
    ctx = _context(args)
    require_reason(args.reason)
    check_delivery(args.stage, ctx.running(), ctx.socket)   # before anything is printed
    if args.candidate:
        saved = operations.load_candidate(ctx, args.candidate)
        cand = operations.checked_candidate(ctx, saved)
        print(f"candidate {saved.get('id')}: threshold {cand.threshold:.4f} for recipe {cand.recipe}, shadow-tested "
              f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(saved.get('tested_at') or 0))} against "
              f"v{saved.get('tested_against_version')}")
    else:
        cand = _candidate(ctx, args)
    _say(render.candidate(cand, operations.candidate_table(ctx, cand, args.last)))
    _confirm(args, f"put threshold {cand.threshold:.4f} in force for recipe {cand.recipe}")
    operations.apply_threshold(ctx, cand, args.reason, args.stage, print)
    return 0


def _confirm(args, what: str) -> None:
    """Ask before a change (``--yes`` answers for a script); UsageError when refused or nobody can answer."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{what}? No terminal to confirm on: add --yes to apply without asking")
    if input(f"{what}? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("not applied: the change was not confirmed")


def cmd_rollback(args) -> int:
    operations.rollback(_context(args), args.to, args.reason, args.stage, print)
    return 0


def cmd_pool_change(args) -> int:
    ctx = _context(args)
    selection = {"part_ids": args.part_ids, "highest": getattr(args, "highest", None),
                 "lowest": getattr(args, "lowest", None)}
    reply = operations.pool_change(ctx, args.recipe, commands.POOL_CHANGES[args.pool_action], args.reason, print,
                                   selection=selection)
    print(f"done: {reply['changed']} member(s) changed; pool now {reply['size']} members, {reply['golden']} golden")
    if reply["golden"] >= ctx.status()["recipes"][args.recipe]["pool"]["capacity"]:
        print("note: the pool is full of golden members, so it takes in no new parts until some are unfrozen")
    return 0


def cmd_pool_reseed(args) -> int:
    ctx = _context(args)
    folder = args.folder.resolve()
    if not folder.is_dir():
        raise UsageError(f"reseed folder not found: {folder}")
    print("every non-golden member is replaced by the folder's images (golden members stay)")
    reply = operations.pool_change(ctx, args.recipe, commands.POOL_RESEED, args.reason, print,
                                   extra={"folder": str(folder)})
    print(f"done: pool now {reply['size']} members")
    return 0


def cmd_timing_set(args) -> int:
    ctx = _context(args)
    require_reason(args.reason)
    check_delivery(args.stage, ctx.running(), ctx.socket)
    timing = merged_timing(args.delay_ms, args.counts, args.lead_ms, operations.current_timing(ctx))
    problem = latency_problem(timing, operations.measured_p99_ms(ctx))
    if problem and not args.despite_latency:
        raise UsageError(f"refused: {problem}; give --despite-latency \"why\" to set it anyway")
    if problem:
        print(f"warning: {problem} (set anyway: {args.despite_latency})")
    print("each part's verdict deadline becomes capture + camera-to-ejector delay - actuator lead; a verdict "
          "later than that is not signalled and the PLC's fail-safe applies")
    reason = args.reason if not problem else f"{args.reason} (set despite the measured latency: {args.despite_latency})"
    operations.change_calibration(ctx, "timing.set", reason, args.stage,
                                  lambda raw: {**raw, "reject_timing": timing}, print)
    return 0


def cmd_timing_dry_run(args) -> int:
    ctx = _context(args)
    on = args.state == "on"
    if on:
        print("dry-run ON: verdicts are recorded in the ledger but NOT sent to the PLC; unless the PLC bypasses "
              "inspection, its inspect window then rejects every part")
    else:
        print("dry-run off: verdicts are signalled to the PLC again")
    operations.change_calibration(ctx, "timing.dry-run", args.reason, args.stage,
                                  lambda raw: {**raw, "dry_run": on}, print)
    if not on and not args.stage and ctx.request({"cmd": commands.STATUS})["dry_run"]:
        print("warning: the line still runs dry because its config sets line.dry_run: true")
    return 0


def cmd_timing_test_fire(args) -> int:
    part_id = args.part_id or f"TEST-{time.strftime('%Y%m%d-%H%M%S')}"
    reply = operations.test_fire(_context(args), args.recipe, part_id, args.reason, print)
    print(f"signalled as seq {reply['seq']}; PLC {'acknowledged' if reply['acked'] else 'did NOT acknowledge'} it")
    return 0 if reply["acked"] else 1


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
            p.add_argument("--candidate", metavar="ID|FILE",
                           help="apply exactly the candidate `threshold shadow` tested (its id or file); refused "
                                "when the pool or the calibration in force has moved since")
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
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
    p.add_argument("--lead-ms", type=float, help="the ejector needs the verdict this much earlier (default: the "
                                                  "lead in force, 0 when none)")
    p.add_argument("--despite-latency", metavar="WHY",
                   help="set a delay shorter than the measured p99 latency + margin anyway (recorded)")
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
        if getattr(args, "json", False):   # a script asked for JSON: it gets its error as JSON too
            print_json({"ok": False, "error": message, "exit_code": 2})
        else:
            print(f"musc-calibrate {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
