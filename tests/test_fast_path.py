"""The fast path: a line shadows its warm-up parts through the INT8 model and switches only when both paths agree."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from musc_edge.edge.config import parse_config
from musc_edge.edge.cpu_features import CpuFeatures
from musc_edge.edge.features import FeatureEngine
from musc_edge.edge.manifest import load_manifest, write_manifest
from musc_edge.edge.mediaio import read_image
from musc_edge.edge.record import PartRecord, Reason
from musc_edge.edge.runtime.fast_path import (ALIGN_BELOW, ShadowResult, align_scale, decide, plan_fast_path,
                                             reference_pool)
from musc_edge.edge.runtime.inspector import Inspector
from musc_edge.edge.runtime.pool_store import pool_path
from musc_edge.export.quantize import quantize_int8
from musc_edge.export.verify import VariantGate, load_images

from .toymodel import build_toy_model, cut_outputs

AVX2 = CpuFeatures("x86_64", "AMD EPYC", avx2=True, fma=True)
# The toy's warm-up parts score -0.8..1.2 (members) and 2.5..3.0 (outliers): a threshold between them is what a
# calibrated line has; one at 1.0 would sit on a part's score, where any rounding flips a verdict.
THRESHOLD = 1.8


@pytest.fixture(scope="module")
def agreeing(tmp_path_factory) -> Path:
    """A folder with the toy fp32 model (blocks 3, 6, 9, 12) and the INT8 variant of its cut at the scored
    blocks 6, 9 (7-bit weights where this CPU needs them), as `make setup` builds them for DINOv2."""
    folder = tmp_path_factory.mktemp("agree")
    build_toy_model(folder / "toy.onnx")
    cut = cut_outputs(folder / "toy.onnx", tmp_path_factory.mktemp("cut") / "toy_cut.onnx", (6, 9))
    quantize_int8(cut, folder / "toy_int8.onnx", load_images(None, 4), size=112)
    return folder / "toy.onnx"


@pytest.fixture(scope="module")
def disagreeing(tmp_path_factory) -> Path:
    """A folder whose "INT8" model is another network: the shadow comparison must refuse it."""
    folder = tmp_path_factory.mktemp("disagree")
    build_toy_model(folder / "toy.onnx")
    other = build_toy_model(folder / "other.onnx", seed=1)
    write_manifest(other, replace(load_manifest(other), precision="int8", quantization={"reduce_range": True}))
    return folder / "toy.onnx"


def _config(model: Path, storage: Path, recipes: tuple[str, ...] = ("default",), **model_settings):
    return parse_config({
        "model": {"path": str(model), "size": 112, "blocks": [6, 9], **model_settings},
        "recipes": {name: {"threshold": THRESHOLD, "pool": {"capacity": 20, "min_size": 10}} for name in recipes},
        "source": {"type": "replay", "paths": ["unused.png"]},
        "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:1"}, "storage": {"dir": str(storage)}}, "test")


def _run(inspector: Inspector, paths: list[Path]) -> list[PartRecord]:
    """Parts through the inspector as the line drives it: extract ahead, then inspect and admit."""
    parts = []
    for i, path in enumerate(paths):
        part = PartRecord(part_id=f"p{i}", recipe="default", capture_time=time.time(), image=read_image(path))
        extracted = inspector.extract(part)
        part, prepared = inspector.inspect(part, extracted)
        inspector.admit(part, prepared)
        parts.append(part)
    return parts


def _good_parts(synthetic_parts: Path) -> list[Path]:
    return sorted((synthetic_parts / "test" / "good").glob("*.png"))


def test_the_line_switches_when_both_paths_agree(agreeing, synthetic_parts, tmp_path):
    inspector = Inspector(_config(agreeing, tmp_path))
    events = []
    inspector.on_fast_path = events.append
    fp32_sha = inspector.engine.manifest.model_sha256
    assert inspector.fast_path is not None and inspector.fast_path.plan.model.name == "toy_int8.onnx"
    parts = _run(inspector, _good_parts(synthetic_parts)[:16])
    warm = sum(p.reason == Reason.WARMUP for p in parts)
    assert warm >= 10 and all(p.reason == Reason.WARMUP for p in parts[:warm])
    assert len(events) == 1 and events[0].switched, events
    assert events[0].old_model == fp32_sha and events[0].new_model == load_manifest(agreeing.parent /
                                                                                      "toy_int8.onnx").model_sha256
    assert "passes the verify gate" in events[0].reason and f"{warm}/{warm} same verdicts" in events[0].reason
    pool = inspector.recipes["default"].pool
    assert inspector.engine.manifest.precision == "int8" and pool.scorer_name == "onnx-int8"
    assert inspector.recipes["default"].identity()["tokens"] == events[0].new_model   # an INT8 model: its sha256
    assert all(p.score is not None for p in parts[warm:])   # scored on the fast path
    # the switch outlives a restart: the stored pools (built on the fast path) put the next line on it at once
    inspector.save_pools()
    again = Inspector(_config(agreeing, tmp_path))
    assert again.restore_pools() == {"default": pool.size} and again.engine.manifest.precision == "int8"
    # ... also beside another recipe's damaged pool file, which is set aside (that recipe warms up again)
    pool_path(tmp_path, "second").write_bytes(b"PK\x03\x04" * 9)
    alarms: list[str] = []
    both = Inspector(_config(agreeing, tmp_path, recipes=("default", "second")))
    assert both.restore_pools(alarms.append) == {"default": pool.size, "second": 0}
    assert both.engine.manifest.precision == "int8" and len(alarms) == 1 and "damaged" in alarms[0]


def test_the_line_stays_on_fp32_when_the_paths_disagree(disagreeing, synthetic_parts, tmp_path):
    inspector = Inspector(_config(disagreeing, tmp_path))
    events = []
    inspector.on_fast_path = events.append
    fp32_sha = inspector.engine.manifest.model_sha256
    _run(inspector, _good_parts(synthetic_parts)[:12])
    assert len(events) == 1 and not events[0].switched
    assert "stays on fp32" in events[0].reason and "token cosine" in events[0].reason
    assert inspector.engine.manifest.model_sha256 == fp32_sha and inspector.fast_path.state == "fp32"
    assert inspector.recipes["default"].pool.scorer_name != "onnx-int8"
    # a restart on the stored fp32 pool has no warm-up to shadow: it stays on fp32 and records nothing new
    inspector.save_pools()
    again, later = Inspector(_config(disagreeing, tmp_path)), []
    again.on_fast_path = later.append
    again.restore_pools()
    assert again.fast_path.state == "fp32" and not later and again.engine.manifest.model_sha256 == fp32_sha


def test_opt_out_and_missing_models_run_no_trial(agreeing, toy_model, tmp_path):
    assert plan_fast_path(_config(agreeing, tmp_path, fast_path="off")).why_not == "model.fast_path is off"
    assert "no INT8 feature model" in plan_fast_path(_config(toy_model, tmp_path)).why_not
    assert Inspector(_config(agreeing, tmp_path, fast_path="off")).fast_path is None


def test_an_8_bit_model_is_not_tried_where_its_products_saturate(agreeing, tmp_path):
    manifest = load_manifest(agreeing.parent / "toy_int8.onnx")
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("toy.onnx", "toy_int8.onnx"):
        (folder / name).write_bytes((agreeing.parent / name).read_bytes())
    write_manifest(folder / "toy.onnx", load_manifest(agreeing))
    write_manifest(folder / "toy_int8.onnx", replace(manifest, quantization={**manifest.quantization,
                                                                               "reduce_range": False}))
    plan = plan_fast_path(_config(folder / "toy.onnx", tmp_path), cpu=AVX2)
    assert plan.model is None and "saturate" in plan.why_not


@pytest.mark.parametrize("result, switch, says", [
    (ShadowResult(10, 10, 0.999, 0.01), True, "passes"),
    (ShadowResult(10, 9, 0.999, 0.01), False, "verdict agreement 90.0 %"),
    (ShadowResult(10, 10, 0.95, 0.01), False, "token cosine"),
    (ShadowResult(10, 10, 0.999, 0.15), False, "score drift 0.150 > 0.1"),
    (ShadowResult(5, 5, 0.999, 0.0), False, "only 5 warm-up parts"),
    (ShadowResult(20, 19, 0.999, 0.05, ("p7",), borderline=1), True, "1 flips within the allowed drift"),
    (ShadowResult(20, 18, 0.999, 0.05, ("p7", "p9"), borderline=1), False, "verdict agreement 95.0 %"),
])
def test_decision_is_the_verify_gate(result, switch, says):
    ok, why = decide(result)
    assert ok is switch and says in why
    assert decide(ShadowResult(10, 9, 0.999, 0.01), VariantGate(min_agreement=0.9))[0]
    assert np.isclose(ShadowResult(200, 199, 1.0, 0.0).agreement, 0.995)


def test_a_flip_counts_against_the_gate_only_outside_the_allowed_drift_of_the_threshold():
    from musc_edge.export.verify import GATE, verdict_flips

    band = GATE.max_score_drift
    parent = np.array([0.50, 1.0 - band / 2, 1.0 + band / 2, 1.0 + 3 * band, 1.0 - 3 * band, 1.2])
    variant = np.array([0.52, 1.0 + band / 4, 1.0 - band / 4, 1.0 - band / 4, 1.0 + band / 4, 1.21])
    decisive, borderline = verdict_flips(parent, variant, 1.0)
    assert borderline.tolist() == [False, True, True, False, False, False]   # near the threshold, either way
    assert decisive.tolist() == [False, False, False, True, True, False]     # clearly on one side, and crossed


class _Scaled:
    """The part of a pool :func:`align_scale` reads and moves: its frozen scale."""

    def __init__(self, scale, policy="frozen"):
        self.scale, self.scale_policy = scale, policy

    @property
    def frozen_scale(self):
        return self.scale if self.scale_policy == "frozen" else None


def test_the_fast_scale_is_aligned_to_fp32_on_the_shadowed_parts():
    rng = np.random.default_rng(0)
    ours = np.concatenate([rng.uniform(-0.5, 1.5, 30), [6.0, 9.0]])          # 30 good parts, 2 clear rejects
    raw = 0.2 + 0.04 * ours + rng.normal(0, 1e-4, ours.size)                  # the fast path's raw scores
    raw[-2:] += 0.2                                                           # its rejects are scored otherwise
    pool = _Scaled((0.205, 0.25))                                             # its own scale: 12 % narrower
    fast = (raw - 0.205) / (0.25 - 0.205)
    aligned, gain, offset = align_scale(pool, ours, fast)
    lo, hi = pool.scale
    assert np.allclose((raw - lo) / (hi - lo), gain * fast + offset)          # the new scale maps raws so
    assert np.allclose((lo, hi), (0.2, 0.24), atol=2e-4)                      # ... and is fp32's, to the noise
    assert np.abs(aligned[:30] - ours[:30]).max() < 0.02 < np.abs(fast[:30] - ours[:30]).max()
    assert (aligned[-2:] >= ALIGN_BELOW).all()                                # rejects stay out of the fit

    # each part's aligned score comes from a fit without it: one part off the line is not fitted onto it
    ours_off = ours.copy()
    ours_off[3] += 0.5
    loo, _, _ = align_scale(_Scaled((0.205, 0.25)), ours_off, fast)
    in_sample = np.polyfit(fast[:30], ours_off[:30], 1)
    assert abs(loo[3] - ours_off[3]) > abs(np.polyval(in_sample, fast[3]) - ours_off[3])

    # no frozen scale, too few parts, or not the same score up to scale: nothing moves
    for unmoved, o, f in [(_Scaled((0.205, 0.25), "members"), ours, fast),
                          (_Scaled((0.205, 0.25)), ours[:4], fast[:4]),
                          (_Scaled((0.205, 0.25)), ours, -fast)]:
        assert align_scale(unmoved, o, f)[1:] == (1.0, 0.0) and unmoved.scale == (0.205, 0.25)


def test_the_trial_compares_members_scored_among_themselves_on_both_paths():
    """A member admitted after the warm-up holds the raw score of its admission; the fp32 side of the trial scores
    the members together again, as the fast copy does, on the line's own scale; a pool just scored is used as is."""
    from musc_edge.edge.pool import FeaturePool

    from .test_pool_scale import GRID, PARAMS, D, N_SETS, P, image_parts

    parts = image_parts(6, seed=3)
    pool = FeaturePool(6, N_SETS, P, D, min_size=3)
    for i in range(4):
        pool.admit(f"p{i}", parts[i], 0.0, parts[i][1][0])
    pool.rescore_members(GRID, PARAMS)
    assert reference_pool(pool, GRID, PARAMS) is pool
    pool.admit("p4", parts[4], 0.0, parts[4][1][0])                       # admitted later, raw score of that day
    reference = reference_pool(pool, GRID, PARAMS)
    together = FeaturePool(6, N_SETS, P, D, min_size=3)
    together.load_state(pool.state())
    together.rescore_members(GRID, PARAMS)
    assert reference is not pool and reference.scale == pool.scale != together.scale
    assert np.allclose(reference.raw_scores[:5], together.raw_scores[:5]) and pool.raw_scores[4] == 0.0


def test_a_running_line_records_its_switch_in_the_ledger_and_the_audit(agreeing, synthetic_parts, tmp_path):
    from musc_edge.edge.plc_sim import PlcSimulator
    from musc_edge.edge.runtime.calibration_state import CalibrationStore
    from musc_edge.edge.runtime.line import Line

    int8_sha = load_manifest(agreeing.parent / "toy_int8.onnx").model_sha256
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        raw = {"line": {"deadline_ms": 5000, "queue_size": 64},
               "model": {"path": str(agreeing), "size": 112, "blocks": [6, 9]},
               "recipes": {"default": {"threshold": THRESHOLD, "pool": {"capacity": 20, "min_size": 10}}},
               "source": {"type": "replay", "paths": [str(p) for p in _good_parts(synthetic_parts)[:16]], "rate": 20.0},
               "link": {"type": "zmq", "endpoint": plc.address},
               "storage": {"dir": str(tmp_path / "line"), "archive": {"enabled": False}}}
        line = Line(parse_config(raw, "test"))
        line.run()
        rows = line.ledger_rows()
    assert len(rows) == 16
    fp32_hash = rows[0].model_hash
    scored = [r for r in rows if r.reason != Reason.WARMUP]
    assert scored and all(r.model_hash == int8_sha[:16] != fp32_hash for r in scored)
    records = [r for r in CalibrationStore(tmp_path / "line").audit.records() if r["action"] == "runtime.fast_path"]
    assert len(records) == 1
    assert records[0]["new"] == {"model_sha256": int8_sha, "scorer": "onnx-int8", "switched": True}
    assert "passes the verify gate" in records[0]["reason"]


class CountingEngine(FeatureEngine):
    """A real feature engine that counts how often the line runs it."""

    calls = 0

    def __call__(self, images, batch_size=8):
        self.calls += 1
        return super().__call__(images, batch_size)


def test_parts_extracted_ahead_of_the_switch_are_scored_with_their_shadow_features(agreeing, synthetic_parts,
                                                                                 tmp_path):
    from musc_edge.edge.runtime.recipes import Prepared

    fp32_engine = CountingEngine(agreeing, size=112)
    inspector = Inspector(_config(agreeing, tmp_path), engine=fp32_engine)
    fast_engine = inspector.fast_path.engine = CountingEngine(inspector.fast_path.plan.model, size=112)
    events = []
    inspector.on_fast_path = events.append
    part = lambda pid, path: PartRecord(part_id=pid, recipe="default", capture_time=time.time(),  # noqa: E731
                                        image=read_image(path))
    paths = _good_parts(synthetic_parts)[:16]
    parts = [part(f"p{i}", path) for i, path in enumerate(paths)]
    # as the line runs: the next part is extracted before this one is decided, and with it a second capture of
    # the same part (a look-ahead reference that surely counts: its distance to the part is about 0)
    ahead = (inspector.extract(parts[0]), None)
    for i, current in enumerate(parts[:-1]):
        extracted = ahead[0]
        twin = part(f"again{i + 1}", paths[i + 1])
        ahead = (inspector.extract(parts[i + 1]), (twin, inspector.extract(twin)))
        inspector.admit(*inspector.inspect(current, extracted))
        if events:
            break
    assert events and events[0].switched
    assert fp32_engine.calls == fast_engine.calls   # every part so far went through both models, once
    crossing, (twin, twin_extracted) = parts[i + 1], ahead[1]   # both extracted by the fp32 model before the switch
    recipe = inspector.recipes["default"]
    fresh = Prepared(inspector.features([crossing.image])[0])   # the fast model's features
    calls = (fp32_engine.calls, fast_engine.calls)
    expected = recipe.score(fresh, crossing.part_id, [fresh]).score
    assert abs(recipe.score(fresh, crossing.part_id).score - expected) > 1e-4   # the reference counts
    assert abs(recipe.score(ahead[0], crossing.part_id, [ahead[0]]).score - expected) > 1e-4   # fp32's differ
    inspector.inspect(crossing, ahead[0], look_ahead=[(twin, twin_extracted)])
    assert crossing.score == pytest.approx(expected, rel=1e-6)
    inspector.inspect(twin, twin_extracted)
    assert twin.score == pytest.approx(recipe.score(fresh, twin.part_id).score, rel=1e-6)
    assert (fp32_engine.calls, fast_engine.calls) == calls   # neither part was extracted again


def test_doctor_says_what_the_line_will_shadow(agreeing, tmp_path):
    import yaml

    from musc_edge.edge.doctor import run_checks

    def fast_path_check(**model):
        path = tmp_path / "line.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"path": str(agreeing), "size": 112, "blocks": [6, 9], **model},
            "source": {"type": "replay", "paths": [str(agreeing)]},
            "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:5599"}, "storage": {"dir": str(tmp_path / "s")}}))
        return next(c for c in run_checks(path) if c.name == "fast path")

    assert "toy_int8.onnx + onnx-int8" in fast_path_check().detail
    assert fast_path_check(fast_path="off").detail == "stays on fp32: model.fast_path is off"


def test_a_part_that_missed_its_deadline_still_warms_the_pool_up_but_never_a_ready_one(agreeing, synthetic_parts,
                                                                                          tmp_path):
    """An overloaded start (every warm-up part through both models) misses deadlines: those parts would have had
    no verdict either way, so their features still fill the warming pool (the line's row says DEADLINE)."""
    inspector = Inspector(_config(agreeing, tmp_path, fast_path="off"))
    pool = inspector.recipes["default"].pool
    for i, path in enumerate(_good_parts(synthetic_parts)[:12]):
        part = PartRecord(part_id=f"late{i}", recipe="default", capture_time=time.time(), image=read_image(path))
        inspector.admit_late_warmup(part, inspector.extract(part))
    assert pool.ready and pool.size >= pool.min_size
    size = pool.size
    part = PartRecord(part_id="after", recipe="default", capture_time=time.time(),
                      image=read_image(_good_parts(synthetic_parts)[12]))
    inspector.admit_late_warmup(part, inspector.extract(part))
    assert pool.size == size and part.verdict is None   # a ready pool admits only decided parts
    inspector.admit_late_warmup(PartRecord(part_id="bad", recipe="default", capture_time=0.0), None)
    assert pool.size == size
