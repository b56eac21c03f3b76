"""musc-calibrate without a real line: the threshold method, shadow replay, the audit chain, the calibration
store, and the command line's answers to bad input (against a fake control socket where a line is needed)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from musc_edge.calibration.cli import main
from musc_edge.calibration.shadow import shadow_thresholds, verdict_changes
from musc_edge.calibration.thresholds import ThresholdError, fit_threshold, refine_with_labels
from musc_edge.edge.ledger import Ledger
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime.calibration_state import (AuditError, AuditLog, Calibration, CalibrationAuthority,
                                                       CalibrationStore, StoreError, parse_calibration,
                                                       read_audit_key)
from musc_edge.edge.runtime.control import ControlServer, ensure_token


def gumbel_tail(threshold: float, mu: float, beta: float) -> float:
    """True share of Gumbel(mu, beta) scores at or above ``threshold``."""
    return float(-np.expm1(-np.exp(-(threshold - mu) / beta)))


# -- thresholds ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("contamination", [0.0, 0.1, 0.25])
def test_label_free_threshold_hits_the_target_on_a_contaminated_stream(contamination):
    rng = np.random.default_rng(7)
    n_good = 4000
    good = rng.gumbel(0.10, 0.03, n_good)
    defects = rng.uniform(0.35, 1.5, int(n_good * contamination / (1 - contamination)))
    scores = rng.permutation(np.concatenate([good, defects]))
    fit = fit_threshold(scores, 0.01)
    assert 0.007 <= gumbel_tail(fit.threshold, 0.10, 0.03) <= 0.014
    assert abs(fit.outlier_fraction - contamination) < 0.03
    if contamination:
        # The raw quantile is what a naive calibration would take: it lands among the defects.
        naive = fit_threshold(scores, 0.01, "empirical").threshold
        assert gumbel_tail(naive, 0.10, 0.03) < 1e-4 and naive > 0.35


def test_normal_tail_underestimates_a_gumbel_like_score_tail():
    scores = np.random.default_rng(3).gumbel(0.1, 0.03, 4000)
    assert gumbel_tail(fit_threshold(scores, 0.01, "mad").threshold, 0.1, 0.03) > 0.02
    assert gumbel_tail(fit_threshold(scores, 0.01, "gumbel").threshold, 0.1, 0.03) < 0.014


@pytest.mark.parametrize("target", [0.0, 1.0, -0.01, 1.5, float("nan"), True])
def test_target_rate_outside_zero_one_is_refused(target):
    with pytest.raises(ThresholdError, match=r"must be in \(0, 1\)"):
        fit_threshold(np.linspace(0, 1, 50), target)


def test_too_few_flat_or_mostly_anomalous_scores_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ThresholdError, match="19 scores are too few.*at least 20"):
        fit_threshold(rng.gumbel(size=19), 0.01)
    with pytest.raises(ThresholdError, match="no spread"):
        fit_threshold(np.full(50, 0.2), 0.01)
    mostly_bad = np.concatenate([rng.gumbel(0.1, 0.01, 40), rng.uniform(1, 2, 60)])
    with pytest.raises(ThresholdError, match="not mostly good parts"):
        fit_threshold(mostly_bad, 0.01)
    with pytest.raises(ThresholdError, match="unknown threshold method"):
        fit_threshold(rng.gumbel(size=50), 0.01, "quantile")


def test_confirmed_parts_move_the_threshold_only_when_it_disagrees_with_them():
    same = refine_with_labels(0.5, {"g1": 0.3}, {"b1": 0.8}, margin=0.05)
    assert not same.changed and same.threshold == 0.5
    raised = refine_with_labels(0.5, {"g1": 0.3, "g2": 0.55}, {"b1": 0.8}, margin=0.05)
    assert raised.changed and raised.threshold == pytest.approx(0.60) and "g2" in raised.explanation
    lowered = refine_with_labels(0.5, {}, {"b1": 0.42}, margin=0.05)
    assert lowered.threshold == pytest.approx(0.37) and lowered.threshold <= 0.42
    tight = refine_with_labels(0.5, {"g": 0.55}, {"b": 0.57}, margin=0.05)
    assert 0.55 < tight.threshold <= 0.57
    with pytest.raises(ThresholdError, match="no threshold separates"):
        refine_with_labels(0.5, {"g": 0.7}, {"b": 0.6}, margin=0.05)


# -- shadow ----------------------------------------------------------------------------------------------------
def write_ledger(path: Path, scores: list[float | None], threshold: float = 0.5, recipe: str = "default") -> None:
    ledger = Ledger(path)
    for k, score in enumerate(scores, 1):
        part = PartRecord(part_id=f"p{k}", recipe=recipe, capture_time=float(k), source_ref=f"/data/good/{k}.png")
        if score is None:
            part.decide(Verdict.NO_VERDICT, Reason.WARMUP, "warm-up")
        else:
            part.raw_score, part.score, part.threshold = score, score, threshold
            part.decide(*((Verdict.REJECT, Reason.ANOMALY) if score >= threshold else (Verdict.ACCEPT, Reason.OK)))
        part.signalled = Verdict.ACCEPT if part.verdict == Verdict.ACCEPT else Verdict.REJECT
        ledger.reserve(part, model_hash="m", config_hash="c", calibration_version="0")
    ledger.close()


def test_verdict_changes_flags_both_directions():
    to_reject, to_accept = verdict_changes(np.array([0.1, 0.4, 0.6, 0.9]), np.array([False, False, True, True]), 0.5)
    assert to_reject.tolist() == [False, False, False, False] and to_accept.tolist() == [False, False, False, False]
    to_reject, to_accept = verdict_changes(np.array([0.1, 0.4, 0.6, 0.9]), np.array([False, False, True, True]),
                                           np.array([0.3, 0.3, 0.7, 0.7]))
    assert to_reject.tolist() == [False, True, False, False] and to_accept.tolist() == [False, False, True, False]


def test_shadow_replays_a_candidate_over_the_ledger(tmp_path):
    write_ledger(tmp_path / "ledger.sqlite", [None, 0.2, 0.45, 0.55, 0.9, 0.3])
    reader = Ledger.open_readonly(tmp_path / "ledger.sqlite")
    rows = list(reader.iter_rows())
    reader.close()
    report = shadow_thresholds(rows, {"default": 0.4})
    assert (report.rows, report.scored, report.rejected_now, report.rejected_candidate) == (6, 5, 2, 3)
    assert [f.part_id for f in report.newly_rejected] == ["p3"] and not report.newly_accepted
    report = shadow_thresholds(rows, {"default": 0.6})
    assert [f.part_id for f in report.newly_accepted] == ["p4"] and report.newly_accepted[0].old_threshold == 0.5
    assert shadow_thresholds(rows, {"other": 0.1}).changed == 0


# -- audit log -------------------------------------------------------------------------------------------------
KEY = bytes(range(32))   # a device secret for logs made outside a line


def filled_log(folder: Path, n: int = 4) -> AuditLog:
    log = AuditLog(folder, KEY)
    for i in range(n):
        log.append(who="tech@line", action="threshold.apply", target="calibration", old={"t": i},
                   new={"t": i + 1}, reason=f"change {i}")
    return log


def test_audit_chain_verifies_and_links_each_record_to_the_previous(tmp_path):
    log = filled_log(tmp_path)
    records = log.records()
    assert [r["seq"] for r in records] == [1, 2, 3, 4] and records[0]["prev_sha256"] == "0" * 64
    assert len({r["prev_sha256"] for r in records}) == 4
    result = log.verify()
    assert result.ok and result.records == 4


def _edit(lines: list[str], index: int) -> list[str]:
    record = json.loads(lines[index])
    record["new"] = {"t": 99}
    lines[index] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return lines


@pytest.mark.parametrize("tamper, expected", [
    (lambda lines: _edit(lines, 1), "record 3: chain broken"),
    (lambda lines: lines[:1] + lines[2:], "record 2: chain broken"),
    (lambda lines: _edit(lines, 3), "last record was edited or deleted"),
    (lambda lines: lines[:3], "last record was edited or deleted"),
    (lambda lines: [lines[0][:-5]] + lines[1:], "record 1 is not valid JSON"),
])
def test_audit_verify_detects_an_edited_or_deleted_record(tmp_path, tamper, expected):
    log = filled_log(tmp_path)
    log.path.write_text("\n".join(tamper(log.path.read_text().splitlines())) + "\n")
    result = log.verify()
    assert not result.ok and any(expected in p for p in result.problems), result.problems
    with pytest.raises(AuditError, match="does not verify"):
        log.append(who="x", action="a", target="t", old=None, new=None, reason="r")


def test_audit_requires_a_reason_and_records_failures(tmp_path):
    log = AuditLog(tmp_path, KEY)
    with pytest.raises(AuditError, match="reason is required"):
        log.append(who="x", action="a", target="t", old=None, new=None, reason="  ")

    def fail() -> dict:
        raise RuntimeError("line went away")
    with pytest.raises(RuntimeError):
        log.record_change(who="x", action="a", target="t", old=1, new=2, reason="why", perform=fail)
    intent, result = log.records()
    assert result["result_of"] == intent["seq"] and result["new"] == {"failed": "line went away"}
    assert log.verify().ok


# -- store -----------------------------------------------------------------------------------------------------
def test_versions_are_immutable_and_current_is_checked_against_its_version(tmp_path):
    store = CalibrationStore(tmp_path, KEY)
    calibration = Calibration(version=1, recipes={"default": {"threshold": 0.4}})
    store.save_version(calibration)
    with pytest.raises(StoreError, match="never rewritten"):
        store.save_version(calibration)
    store.write_current(calibration)
    assert store.current() == calibration and store.versions() == [1]
    assert sorted(p.name for p in store.dir.iterdir()) == ["current.json", "v0001.json"]   # no temp files left

    edited = json.loads(store.current_path.read_text())
    edited["recipes"]["default"]["threshold"] = 0.9
    store.current_path.write_text(json.dumps(edited))
    with pytest.raises(StoreError, match="differs from v0001.json.*rollback"):
        store.current()
    store.current_path.write_text('{"version": 1, "recipes": {"default": {"threshold": 0.4}}, "dry_run": "maybe"}')
    with pytest.raises(StoreError, match="current.json is invalid: dry_run"):
        store.current()
    store.current_path.write_text("{not json")
    with pytest.raises(StoreError, match="current.json is not valid JSON"):
        store.current()


# -- command line ----------------------------------------------------------------------------------------------
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def storage(tmp_path) -> Path:
    folder = tmp_path / "line"
    folder.mkdir()
    return folder


class FakeLine:
    """The control socket of a running line, answering like edge_app/runtime/line.py (no model, no parts): its
    calibration authority is the runtime's own."""

    def __init__(self, storage: Path, pool_scores: list[float], refuse_apply: bool = False):
        self.storage, self.pool_scores, self.refuse_apply = storage, pool_scores, refuse_apply
        self.threshold, self.version, self.applied = 0.5, "0", []
        self.authority = CalibrationAuthority(storage, {"default"}, "runtime:fake")
        self.in_force = self.authority.at_start("fake")
        self.server = ControlServer(storage / "control.sock", ensure_token(storage), self.handle)

    def handle(self, request: dict) -> dict:
        from musc_edge.edge.runtime.control import ControlError

        if request["cmd"] == "status":
            return {"line": "fake", "calibration_version": self.version, "dry_run": False, "reject_timing": None,
                    "recipes": {"default": {"threshold": self.threshold, "pool": {}}}}
        if request["cmd"] == "pool_scores":
            return {"recipe": "default", "threshold": self.threshold, "scores": self.pool_scores}
        if request["cmd"] == "apply":
            if self.refuse_apply:
                raise ControlError("calibration is invalid: simulated refusal")
            calibration = request["calibration"]
            self.in_force = self.authority.put_in_force(parse_calibration(calibration), self.in_force, "fake")
            self.applied.append(calibration)
            self.threshold = calibration["recipes"]["default"]["threshold"]
            self.version = str(calibration["version"])
            return {"version": calibration["version"]}
        if request["cmd"] == "audit_append":
            return {"record": self.authority.append_for_client(request["record"])}
        raise ControlError(f"unknown command {request['cmd']!r}")

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake_line(storage):
    scores = list(np.random.default_rng(1).gumbel(0.1, 0.03, 40))
    line = FakeLine(storage, scores)
    yield line
    line.close()


def test_a_change_with_no_running_line_is_refused_and_changes_nothing(storage, capsys):
    code, _, err = run_cli(capsys, "threshold", "apply", "--yes", "--storage", str(storage), "--threshold", "0.3",
                           "--reason", "try")
    assert_one_line_error(code, err, "no running line answers", "--stage")
    assert not (storage / "calibration").exists()
    code, _, err = run_cli(capsys, "status", "--storage", str(storage))
    assert_one_line_error(code, err, "is the runtime started?")


@pytest.mark.parametrize("args, fragment", [
    (["--target-frr", "1.5"], "must be in (0, 1)"),
    (["--target-frr", "0"], "must be in (0, 1)"),
    (["--target-frr", "one percent"], "expected a rate"),
])
def test_target_rate_outside_zero_one_is_a_one_line_error(storage, capsys, args, fragment):
    with pytest.raises(SystemExit) as exited:
        main(["threshold", "suggest", "--storage", str(storage), *args])
    assert exited.value.code == 2
    assert_one_line_error(2, capsys.readouterr().err, fragment)


def test_unknown_part_ids_and_too_few_ledger_scores_are_refused(storage, capsys):
    write_ledger(storage / "ledger.sqlite", [None] * 3 + list(np.linspace(0.1, 0.3, 30)))
    common = ["threshold", "suggest", "--storage", str(storage), "--from", "ledger"]
    code, _, err = run_cli(capsys, *common, "--good", "p5,nope,p7", "--bad", "missing")
    assert_one_line_error(code, err, "unknown part id(s) nope", "ledger.sqlite")
    code, _, err = run_cli(capsys, *common, "--good", "p1")
    assert_one_line_error(code, err, "p1 have no score")
    code, _, err = run_cli(capsys, *common, "--last", "15")
    assert_one_line_error(code, err, "only 15 scored parts", "at least 20")
    code, out, _ = run_cli(capsys, *common, "--json")
    assert code == 0 and json.loads(out)["fit"]["n"] == 30


def test_a_pool_too_small_to_calibrate_from_is_refused(storage, capsys):
    line = FakeLine(storage, pool_scores=[0.1] * 8)
    try:
        code, _, err = run_cli(capsys, "threshold", "suggest", "--storage", str(storage))
    finally:
        line.close()
    assert_one_line_error(code, err, "too small to calibrate from: 8 members", "at least 20")


def test_apply_reaches_the_line_and_current_json_follows_its_acknowledgement(storage, fake_line, capsys):
    code, out, err = run_cli(capsys, "threshold", "apply", "--yes", "--storage", str(storage), "--target-frr", "0.01",
                             "--reason", "commissioning")
    assert code == 0, err
    assert "modelled false-reject rate" in out and "in force" in out
    assert fake_line.version == "1" and len(fake_line.applied) == 1
    current = json.loads((storage / "calibration" / "current.json").read_text())
    assert current == fake_line.applied[0]
    assert 0.1 < current["recipes"]["default"]["threshold"] < 0.5
    code, _, err = run_cli(capsys, "threshold", "apply", "--yes", "--storage", str(storage), "--threshold", "0.3",
                           "--reason", "x", "--stage")
    assert_one_line_error(code, err, "the line is running", "without --stage")


def test_a_refused_apply_leaves_current_json_alone_and_is_recorded(storage, capsys):
    line = FakeLine(storage, pool_scores=[], refuse_apply=True)
    try:
        code, _, err = run_cli(capsys, "threshold", "apply", "--yes", "--storage", str(storage), "--threshold", "0.3",
                               "--reason", "try")
    finally:
        line.close()
    assert_one_line_error(code, err, "simulated refusal")
    assert not (storage / "calibration" / "current.json").exists()
    records = AuditLog(storage / "calibration").records()
    assert [r["action"] for r in records] == ["baseline", "threshold.apply", "threshold.apply"]
    assert "failed" in records[-1]["new"]


def test_staged_change_takes_effect_at_next_start_and_a_hand_edit_is_repaired_by_rollback(storage, capsys):
    stage = ["--storage", str(storage), "--stage"]
    code, _, err = run_cli(capsys, "threshold", "apply", "--yes", *stage, "--threshold", "0.3", "--reason", "x")
    assert_one_line_error(code, err, "no calibration yet", "--config")
    assert not (storage / "calibration").exists()
    config = storage.parent / "line.yaml"
    config.write_text(json.dumps({"source": {"type": "replay", "path": str(storage)},
                                  "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:1"},
                                  "storage": {"dir": str(storage)}}))
    stage = ["--config", str(config), "--stage"]
    assert run_cli(capsys, "threshold", "apply", "--yes", *stage, "--threshold", "0.3", "--reason", "offline")[0] == 0
    code, out, err = run_cli(capsys, "timing", "set", *stage, "--delay-ms", "600", "--lead-ms", "20",
                             "--reason", "measured with a test part")
    assert code == 0 and "staged" in out, err
    staged = CalibrationStore(storage).current()   # what the runtime reads at its next start
    assert staged.version == 2 and staged.recipes["default"].threshold == 0.3 and staged.reject_timing.delay_ms == 600

    code, _, err = run_cli(capsys, "timing", "set", *stage, "--delay-ms", "10", "--lead-ms", "20", "--reason", "x")
    assert_one_line_error(code, err, "actuator_lead_ms must be shorter than delay_ms")
    audit_before = (storage / "calibration" / "audit.jsonl").read_bytes()
    current = storage / "calibration" / "current.json"
    current.write_text(current.read_text().replace('"delay_ms": 600.0', '"delay_ms": -5'))
    code, _, err = run_cli(capsys, "threshold", "apply", "--yes", *stage, "--threshold", "0.2", "--reason", "x")
    assert_one_line_error(code, err, "current.json is invalid", "reject_timing.delay_ms", "rollback")
    assert (storage / "calibration" / "audit.jsonl").read_bytes() == audit_before
    assert run_cli(capsys, "audit", "verify", "--config", str(config))[0] == 1

    code, out, err = run_cli(capsys, "rollback", *stage, "--to", "1", "--reason", "repair hand edit")
    assert code == 0 and "invalid and will be replaced" in out, err
    assert CalibrationStore(storage).current().version == 1
    assert run_cli(capsys, "audit", "verify", "--config", str(config))[0] == 0
    code, _, err = run_cli(capsys, "rollback", *stage, "--to", "7", "--reason", "x")
    assert_one_line_error(code, err, "version 7 does not exist")


def test_concurrent_technicians_get_distinct_versions(storage, fake_line, capsys):
    codes = []

    def apply(threshold: float) -> None:
        codes.append(main(["threshold", "apply", "--yes", "--storage", str(storage), "--threshold", str(threshold),
                           "--reason", "parallel"]))
    threads = [threading.Thread(target=apply, args=(0.2 + 0.01 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    capsys.readouterr()
    assert codes == [0] * 4
    assert CalibrationStore(storage).versions() == [0, 1, 2, 3, 4]
    assert sorted(c["version"] for c in fake_line.applied) == [1, 2, 3, 4]
    assert AuditLog(storage / "calibration", read_audit_key(storage)).verify().ok


def staged_line(storage: Path) -> Path:
    config = storage.parent / "line.yaml"
    config.write_text(json.dumps({"source": {"type": "replay", "path": str(storage)},
                                  "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:1"},
                                  "storage": {"dir": str(storage)}}))
    return config


@pytest.mark.parametrize("delay", ["inf", "nan", "1e13", "-5"])
def test_row_10_timing_set_refuses_a_delay_the_line_cannot_wait_for(storage, capsys, delay):
    config = staged_line(storage)
    code, _, err = run_cli(capsys, "timing", "set", "--config", str(config), "--stage", "--delay-ms", delay,
                           "--reason", "x")
    assert_one_line_error(code, err, "reject_timing.delay_ms")
    assert not (storage / "calibration" / "current.json").exists()


def test_timing_set_keeps_the_lead_and_refuses_a_delay_under_the_measured_latency(storage, capsys):
    config = staged_line(storage)
    stage = ["--config", str(config), "--stage"]
    assert run_cli(capsys, "timing", "set", *stage, "--delay-ms", "900", "--lead-ms", "50", "--reason", "a")[0] == 0
    ledger = Ledger(storage / "ledger.sqlite")   # the line's measured latency: 282 ms per part
    for k in range(30):
        part = PartRecord(part_id=f"p{k}", recipe="default", capture_time=float(k))
        part.raw_score = part.score = part.threshold = 0.1
        part.decide(Verdict.ACCEPT, Reason.OK)
        part.signalled, part.times.total = Verdict.ACCEPT, 0.282
        ledger.reserve(part, model_hash="m", config_hash="c", calibration_version="1")
    ledger.close()
    code, _, err = run_cli(capsys, "timing", "set", *stage, "--delay-ms", "200", "--reason", "b")
    assert_one_line_error(code, err, "p99 latency is 282 ms", "--despite-latency")
    code, out, err = run_cli(capsys, "timing", "set", *stage, "--delay-ms", "400", "--reason", "c")
    assert code == 0 and "reject_timing.delay_ms: 900 -> 400" in out and "actuator_lead_ms" not in out, out + err
    assert CalibrationStore(storage).current().reject_timing.actuator_lead_ms == 50   # omitted: kept
    code, out, err = run_cli(capsys, "timing", "set", *stage, "--delay-ms", "200", "--reason", "d",
                             "--despite-latency", "PLC holds parts for 300 ms more")
    assert code == 0 and "warning" in out, err
    assert "despite the measured latency" in AuditLog(storage / "calibration").records()[-2]["reason"]
    code, out, _ = run_cli(capsys, "versions", "--config", str(config))
    assert "reject_timing.actuator_lead_ms: - -> 50" in out and "reject_timing.delay_ms: 400 -> 200" in out, out


def test_after_stage_shadow_compares_against_the_staged_threshold(storage, capsys):
    config = staged_line(storage)
    write_ledger(storage / "ledger.sqlite", list(np.linspace(0.1, 0.9, 40)), threshold=0.5)
    assert run_cli(capsys, "threshold", "apply", "--yes", "--config", str(config), "--stage", "--threshold", "0.3",
                   "--reason", "staged")[0] == 0
    code, out, err = run_cli(capsys, "threshold", "shadow", "--config", str(config), "--threshold", "0.3",
                             "--from", "ledger", "--json")
    report = json.loads(out)["report"]
    assert code == 0 and json.loads(out)["current"] == 0.3, err
    assert report["newly_rejected"] == [] and report["newly_accepted"] == []   # the same as what is staged


def test_a_technician_who_cannot_read_the_device_secret_changes_the_line_through_it(storage, fake_line, capsys,
                                                                                    monkeypatch):
    monkeypatch.setattr("musc_edge.calibration.client.read_audit_key", lambda storage: None)   # not the runtime's user
    code, out, err = run_cli(capsys, "threshold", "apply", "--yes", "--storage", str(storage), "--threshold", "0.3",
                             "--reason", "via the line")
    assert code == 0 and "in force" in out, err
    log = AuditLog(storage / "calibration", read_audit_key(storage))
    assert [r["action"] for r in log.records()] == ["baseline", "threshold.apply", "runtime.applied",
                                                    "threshold.apply"]
    assert log.verify().ok and log.verify().keyed            # every record signed by the line
    fake_line.close()
    code, _, err = run_cli(capsys, "timing", "set", "--storage", str(storage), "--stage", "--delay-ms", "500",
                           "--reason", "line stopped")
    assert_one_line_error(code, err, "readable only by", "run this change as that user")
