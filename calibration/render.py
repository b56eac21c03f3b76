"""How ``musc-calibrate`` shows things: percentages, ages, histograms, setting changes, JSON."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from .thresholds import reject_rate

if TYPE_CHECKING:
    from .decisions import Candidate
    from .shadow import ShadowReport


def pct(value: float) -> str:
    return f"{100 * value:6.2f} %"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def histogram(scores: np.ndarray, threshold: float, bins: int = 10, width: int = 40) -> list[str]:
    """A terminal histogram of ``scores`` with the threshold's bin marked; the top 2 % of scores beyond the
    threshold share one overflow line so a few extreme parts do not squash the rest."""
    scores = np.asarray(scores, np.float64)
    lo = min(float(scores.min()), threshold)
    hi = max(float(np.quantile(scores, 0.98)), threshold)
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.histogram(np.minimum(scores, hi), edges)[0]
    overflow = int(np.count_nonzero(scores > hi))
    counts[-1] -= overflow
    mark = min(int(np.searchsorted(edges, threshold, side="right")) - 1, bins - 1)
    top = max(int(counts.max()), overflow, 1)
    lines = [f"  {edges[i]:9.4f} .. {edges[i + 1]:9.4f} |{'#' * round(width * c / top):<{width}}| {c:>5}"
             + ("  <- threshold" if i == mark else "") for i, c in enumerate(counts)]
    if overflow:
        lines.append(f"  {'above':>9}    {hi:9.4f} |{'#' * round(width * overflow / top):<{width}}| {overflow:>5}")
    return lines


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def describe_change(old: dict | None, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (version and file hashes left out)."""
    before, after = _flatten(old or {}), _flatten(new)
    keys = [k for k in dict.fromkeys([*before, *after]) if k not in ("version", "file_sha256")]
    def shown(value) -> str:
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    return [f"{k}: {shown(before.get(k, '-'))} -> {shown(after.get(k, '-'))}" for k in keys
            if before.get(k) != after.get(k)]


def print_json(value) -> None:
    print(json.dumps(value, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def status(status: dict, stored_note, scores: dict[str, list[float]]) -> list[str]:
    """``musc-calibrate status``: calibration, counters, latency, link, alarms, pools and recent scores."""
    timing = status["reject_timing"]
    if timing is None:
        timing_text = "line.deadline_ms (no reject timing calibrated)"
    else:
        distance = f"{timing['delay_ms']:g} ms" if timing["mode"] == "time" else f"{timing['counts']} counts"
        timing_text = f"{timing['mode']} mode, {distance}, actuator lead {timing['actuator_lead_ms']:g} ms"
    lines = [f"line {status['line']}: RUNNING   calibration v{status['calibration_version']}   "
             f"dry-run {'ON (verdicts are logged, NOT signalled)' if status['dry_run'] else 'off'}"]
    if stored_note is not None and str(stored_note) != str(status["calibration_version"]):
        lines.append(f"  note: current.json is {stored_note}; the line runs v{status['calibration_version']}")
    lines.append(f"reject timing: {timing_text}")
    stats = status["stats"]
    verdicts = stats["by_verdict"]
    reasons = " ".join(f"{k}={v}" for k, v in sorted(stats["by_reason"].items()))
    lines.append(f"parts {stats['parts']}: OK {verdicts['ACCEPT']}  NG {verdicts['REJECT']}  NO_VERDICT "
                 f"{verdicts['NO_VERDICT']}{f' ({reasons})' if reasons else ''}  acked {stats['acked']}   "
                 f"queue {status['queue_depth']}")
    latency = stats["latency_ms"]
    if latency:
        lines.append(f"latency ms: min {latency['min']:.0f}  p50 {latency['p50']:.0f}  p99 {latency['p99']:.0f}  "
                     f"max {latency['max']:.0f}")
    link = status["link"]
    if link:
        lines.append(f"link: {'up' if link['connected'] else 'DOWN'}  last ack {age(link['last_ack_age_s'])} ago  "
                     f"outbox {link['outbox_depth']}  retries {link['retries']}  naks {link['naks']}"
                     + (f"  ALARMS: {'; '.join(link['alarms'])}" if link["alarms"] else ""))
    lines += [f"alarm: {alarm}" for alarm in stats["alarms"]]
    for name, recipe in status["recipes"].items():
        pool = recipe["pool"]
        lines.append(f"\nrecipe {name}: threshold {recipe['threshold']:.4f}")
        lines.append(f"  pool {pool['size']}/{pool['capacity']} members (scores from {pool['min_size']}), "
                     f"{pool['golden']} golden, newest {age(pool['newest_age_s'])}, oldest {age(pool['oldest_age_s'])}")
        recent = scores.get(name) or []
        if recent:
            above = reject_rate(np.asarray(recent), recipe["threshold"])
            lines.append(f"  last {len(recent)} scored parts: {pct(above).strip()} at or above the threshold")
            lines += histogram(np.asarray(recent), recipe["threshold"])
    return lines


def candidate(cand: Candidate, table: list[tuple[str, str, str]]) -> list[str]:
    """A threshold candidate: how it was calibrated, and the expected-reject-rate table."""
    lines = []
    current = "none" if cand.current is None else f"{cand.current:.4f}"
    if cand.fit is not None:
        fit = cand.fit
        lines.append(f"recipe {cand.recipe}: calibrated from {cand.described}, method {fit.method}, target "
                     f"false-reject rate {100 * fit.target_frr:g} %")
        lines.append(f"  good-part model: location {fit.location:.4f}, scale {fit.scale:.4f}; about "
                     f"{100 * fit.outlier_fraction:.1f} % of the scores lie above it (possible defects)")
        if cand.refinement is not None:
            lines.append(f"  confirmed parts: {cand.refinement.explanation}")
    lines.append(f"  threshold {cand.threshold:.4f}   (now {current})")
    if table:
        lines.append(f"  {'expected':<42} {'now':>9} {'new':>9}")
        lines += [f"  {what:<42} {now:>9} {new:>9}" for what, now, new in table]
    return lines


def candidate_json(cand: Candidate, table: list[tuple[str, str, str]]) -> dict:
    return {"recipe": cand.recipe, "threshold": cand.threshold, "current": cand.current, "source": cand.source,
            "described": cand.described,
            "fit": None if cand.fit is None else {k: v for k, v in asdict(cand.fit).items() if k != "sorted_scores"},
            "refinement": cand.refinement and asdict(cand.refinement), "expected": table}


def shadow(report: ShadowReport, show: int) -> list[str]:
    """The verdicts a candidate threshold would change, at most ``show`` listed per direction."""
    lines = [f"  of the last {report.rows} ledger rows, {report.scored} were scored: rejected {report.rejected_now} "
             f"-> {report.rejected_candidate} with the candidate; {report.changed} verdict(s) would change"]
    for title, flips in (("ACCEPT -> REJECT", report.newly_rejected), ("REJECT -> ACCEPT", report.newly_accepted)):
        lines += [f"    {title}  {flip.part_id:<24} score {flip.score:.4f}  (threshold {flip.old_threshold:.4f} -> "
                  f"{flip.new_threshold:.4f})  {flip.source_ref or ''}" for flip in flips[:show]]
        if len(flips) > show:
            lines.append(f"    ... and {len(flips) - show} more {title}")
    return lines


def outcome(version: int, reply: dict) -> str:
    """How a calibration change reached the line."""
    if reply.get("staged"):
        return f"staged: current.json is now v{version}; the line takes it at its next start"
    return f"in force: the line switched to v{version} between two parts and acknowledged it"


def versions(listing: list[dict]) -> list[str]:
    """One line per stored calibration version (and its reason), flagged where it is current or running, then
    every field it changes from the version listed before it (thresholds, reject timing, dry-run)."""
    if not listing:
        return ["no calibration versions yet: the line runs the thresholds of its config"]
    lines, before = [], None
    for item in listing:
        flags = " ".join(f for f, on in (("[current.json]", item["current"]), ("[running]", item["running"])) if on)
        settings = item["settings"]
        thresholds = ", ".join(f"{k} {v['threshold']:.4f}" for k, v in settings.get("recipes", {}).items())
        lines.append(f"v{item['version']:04d}  {item['created'] or '-':<24} {item['who'] or '-':<20} {thresholds}  "
                     f"{timing_text(settings.get('reject_timing'))}{'  DRY-RUN' if settings.get('dry_run') else ''}"
                     f"  {flags}".rstrip())
        if item["reason"]:
            lines.append(f"       {item['reason']}")
        if before is not None and "invalid" not in settings:
            lines += [f"       {change}" for change in describe_change(before, settings)]
        before = settings if "invalid" not in settings else before
    return lines


def timing_text(timing: dict | None) -> str:
    """A reject timing in a few words."""
    if not timing:
        return "timing: line.deadline_ms"
    distance = f"{timing['delay_ms']:g} ms" if timing.get("mode") == "time" else f"{timing.get('counts')} counts"
    return f"timing: {distance} - lead {timing.get('actuator_lead_ms', 0):g} ms"


def pool(recipe: str, members: list[dict], loo: list[float] | None, running: dict, now: float) -> list[str]:
    """A pool's members: slot, part id, age, raw and leave-one-out score, golden flag."""
    lines = [f"pool {recipe}: {len(members)}/{running['pool']['capacity']} members, "
             f"{sum(m['golden'] for m in members)} golden, threshold {running['threshold']:.4f}",
             f"  {'slot':>4}  {'part id':<28} {'age':>9} {'raw score':>10} {'score (loo)':>12}  golden"]
    for i, member in enumerate(members):
        score = "-" if loo is None else f"{loo[i]:.4f}"
        lines.append(f"  {member['slot']:>4}  {member['part_id']:<28} {age(now - member['admitted_time']):>9} "
                     f"{member['raw_score']:>10.4f} {score:>12}  {'yes' if member['golden'] else ''}")
    return lines


def audit_record(record: dict) -> str:
    """One audit record: who, when, what, old -> new, why (a result record in one line)."""
    new = record.get("new") if isinstance(record.get("new"), dict) else {}
    if record.get("action") == "runtime.applied":   # the line's own record of what it put in force
        thresholds = ", ".join(f"{k} {v:.4f}" for k, v in (new.get("thresholds") or {}).items())
        return (f"#{record['seq']:<4} {record['time']}  {record['who']}  in force on the line: v{new.get('version')} "
                f"({thresholds}{', dry-run' if new.get('dry_run') else ''}), authorised by #{record['result_of']}")
    if record.get("result_of") is not None:
        result = "ok" if "ok" in new else "INTERRUPTED (recovered at start)" if "interrupted" in new else \
            f"OUTCOME UNKNOWN: {new.get('unknown')}" if "unknown" in new else f"FAILED: {new.get('failed')}"
        return f"#{record['seq']:<4} {record['time']}  result of #{record['result_of']}: {result}"
    head = (f"#{record['seq']:<4} {record['time']}  {record['who']}  {record['action']}  {record['target']}  "
            f"reason: {record['reason']}")
    old, new = record.get("old"), record.get("new")
    if isinstance(new, dict) and "file_sha256" in new:
        lines = describe_change(old if isinstance(old, dict) else None, new)
        return head + "".join(f"\n        {line}" for line in lines)
    return head + f"\n        {json.dumps(old)} -> {json.dumps(new)}"
