"""3D / 2D+3D (MuSc-V2) recipes on the line: scans replayed with their clouds through the full runtime, bad
scanner frames failing safe, the scan pool's rules and persistence, and the config that selects all this.

Parts are synthetic scans at 112 px (a quarter of MuSc-V2's groups, as ``scan_line_config`` scales them) and
the 2D side is the tiny random toy model, so what is asserted is bookkeeping, fail-safe behaviour and that
geometric (3D-only) defects are caught through the cloud.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from musc_edge.edge.config import ConfigError, parse_config
from musc_edge.edge.evaluation.datasets import read_image
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.pointcloud import read_cloud
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime.inspector import Inspector
from musc_edge.edge.runtime.line import Line
from musc_edge.edge.runtime.pool_store import PoolMismatchError, pool_path, stored_identity
from musc_edge.edge.scan_pool import ScanPool
from musc_edge.edge.score import PoolScore, PreparedScan
from musc_edge.edge.runtime.simulated import CLOUD_PATH, SCAN_PATTERN, run_simulated_scan_line, scan_line_config
from musc_edge.edge.scoring import MuscParams, PoolTooSmallError
from musc_edge.edge.scoring3d import Params3D, prepare_3d
from musc_edge.edge.sources import ReplayConfig, ReplaySource, SourceConfigError
from musc_edge.edge.sources.replay import paired_cloud
from musc_edge.edge.synthetic3d import DEFECT_MODALITY, generate_set, write_mvtec3d

from .test_runtime import assert_each_part_once

SIZE = 112


def write_scans(folder: Path, n: int, seed: int, defect_fraction: float) -> Path:
    return write_mvtec3d(generate_set(n, seed=seed, defect_fraction=defect_fraction, size=SIZE), folder) / "test"


def scans_in(test_folder: Path) -> list[tuple[Path, Path]]:
    return [(p, paired_cloud(p, CLOUD_PATH)) for p in sorted(test_folder.glob(SCAN_PATTERN))]


def seeded_inspector(config, recent: Path) -> Inspector:
    inspector = Inspector(config)
    recipe = inspector.recipes["default"]
    recipe.seed(recipe.read_scans(scans_in(recent)))
    return inspector


@pytest.fixture(scope="module")
def recent(tmp_path_factory) -> Path:
    """Ten good scans to seed pools with."""
    return write_scans(tmp_path_factory.mktemp("recent"), 10, seed=50, defect_fraction=0.0)


# --------------------------------------------------------------------------------------------- the line

def kind_of(row_or_ref) -> str:
    """Defect kind of a replayed scan (``test/<kind>/rgb/NNN.png``)."""
    return Path(getattr(row_or_ref, "source_ref", row_or_ref)).parent.parent.name


def reject_rate(rows, kinds) -> float:
    chosen = [r for r in rows if kind_of(r) in kinds]
    return sum(r.signalled == Verdict.REJECT for r in chosen) / len(chosen)


GEOMETRIC = [k for k, m in DEFECT_MODALITY.items() if m == "3d"]


@pytest.mark.parametrize("modality, pose", [("2d+3d", "none"), ("3d", "none"), ("2d+3d", "axis")])
def test_scanned_parts_are_decided_and_acked_once_and_broken_clouds_fail_safe(modality, pose, toy_model, tmp_path,
                                                                              recent):
    conveyor = write_scans(tmp_path / "conveyor", 30, seed=1, defect_fraction=0.5)
    missing = sorted(conveyor.glob("good/xyz/*.tiff"))[0]
    missing.unlink()
    shrunk = sorted(conveyor.glob("good/xyz/*.tiff"))[0]
    tifffile.imwrite(shrunk, tifffile.imread(shrunk)[: SIZE // 2], photometric="rgb")
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        raw = scan_line_config(plc.address, conveyor, tmp_path / "line", rate=4.0, seed=1, size=SIZE, model=toy_model)
        raw["recipes"]["default"]["modality"] = modality
        raw["recipes"]["default"]["scan"]["pose"] = pose
        config = parse_config(raw)
        line = Line(config, inspector=seeded_inspector(config, recent))
        line.run()
        rows = line.ledger_rows()
        assert_each_part_once(rows, 30, plc)

    broken = {r.source_ref: r for r in rows if kind_of(r) == "good" and Path(r.source_ref).stem in
              (missing.stem, shrunk.stem)}
    assert len(broken) == 2
    assert all(r.reason == Reason.SCANNER_ERROR and r.signalled == Verdict.REJECT for r in broken.values())
    assert any(str(missing) in r.detail and "no such file" in r.detail for r in broken.values())
    assert any("paired image" in r.detail for r in broken.values())
    decided = [r for r in rows if r.source_ref not in broken]
    assert all(r.reason in (Reason.OK, Reason.ANOMALY, Reason.WARMUP) for r in decided), {r.reason for r in decided}
    # warm-up curation may drop outlying seed members; then the first parts refill the pool, never later ones
    warmup = [i for i, r in enumerate(decided) if r.reason == Reason.WARMUP]
    assert warmup == list(range(len(warmup))) and len(warmup) < len(decided) // 2, warmup
    scored = decided[len(warmup):]
    assert (tmp_path / "line" / "pools" / "default.npz").is_file()
    rates = reject_rate(scored, GEOMETRIC), reject_rate(scored, ["good"])
    print(f"{modality}: reject rate of 3D-only defects {rates[0]:.2f}, of good parts {rates[1]:.2f}")
    if modality == "3d":   # the toy model's random 2D features swamp the fused map; see the default-model test
        assert rates[0] > rates[1]


@pytest.mark.slow
def test_2d_plus_3d_with_the_default_model_rejects_3d_only_defects(default_model, tmp_path, recent):
    """The worker's per-part steps (inspect, then admit), without the line's threads and pacing."""
    conveyor = write_scans(tmp_path / "conveyor", 30, seed=1, defect_fraction=0.5)
    raw = scan_line_config("tcp://127.0.0.1:1", conveyor, tmp_path / "line", size=SIZE, model=default_model)
    inspector = seeded_inspector(parse_config(raw), recent)
    rows = []
    for k, (image, _) in enumerate(scans_in(conveyor)):
        part = PartRecord(part_id=f"part{k}", recipe="default", capture_time=0.0, raw=image.read_bytes(),
                          cloud=read_cloud(paired_cloud(image, CLOUD_PATH)), source_ref=str(image))
        part, prepared = inspector.inspect(part)
        inspector.admit(part, prepared)
        part.signalled = part.verdict
        rows.append(part)
    assert all(r.reason in (Reason.OK, Reason.ANOMALY) for r in rows)
    rates = reject_rate(rows, GEOMETRIC), reject_rate(rows, ["good"])
    print(f"2d+3d, default model: reject rate of 3D-only defects {rates[0]:.2f}, of good parts {rates[1]:.2f}")
    assert rates[0] > rates[1]


def test_simulated_scan_line_prints_the_summary(toy_model, tmp_path, capsys):
    code = run_simulated_scan_line(tmp_path, parts=12, rate=4.0, seed=3, model=toy_model, size=SIZE)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "parts        12" in out and "received 12" in out
    assert "ground truth defects rejected" in out and "rejected by kind" in out


# ------------------------------------------------------------------------------- bad scans, one part each

@pytest.fixture(scope="module")
def inspector(toy_model, tmp_path_factory, recent) -> Inspector:
    folder = tmp_path_factory.mktemp("inspect")
    raw = scan_line_config("tcp://127.0.0.1:1", recent, folder / "line", size=SIZE, model=toy_model)
    return seeded_inspector(parse_config(raw), recent)


@pytest.fixture(scope="module")
def good_scan(recent) -> tuple[np.ndarray, np.ndarray]:
    image_path, cloud_path = scans_in(recent)[0]
    image = read_image(image_path)
    return image, read_cloud(cloud_path, image.shape)


def _part(image, cloud, part_id: str = "P1") -> PartRecord:
    return PartRecord(part_id=part_id, recipe="default", capture_time=0.0, image=image.copy(), cloud=cloud,
                      source_ref=f"cam/{part_id}.png")


def _absurd(cloud):
    out = cloud.copy()
    out[5, 7] = (0.0, 0.0, 3e6)
    return out


def _flat(cloud):
    out = np.full_like(cloud, np.nan)
    out[::2, ::2] = (0.01, 0.02, 0.5)          # every point at one spot: no extent, no plane, no groups
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda c: None, "no cloud"),
    (lambda c: np.full_like(c, np.nan), "no valid point"),
    (lambda c: np.zeros_like(c), "no valid point"),
    (lambda c: c[:, :, :2].copy(), "not [H, W, 3]"),
    (lambda c: c.astype(np.float64), "not float32"),
    (lambda c: c[: SIZE // 2].copy(), "cloud is 56x112 but the paired image is 112x112"),
    (_absurd, "absurd coordinate 3e+06 at pixel (5, 7)"),
    (_flat, "P1"),
])
def test_bad_clouds_get_scanner_error_never_a_crash(inspector, good_scan, damage, message):
    image, cloud = good_scan
    part, prepared = inspector.inspect(_part(image, damage(cloud)))
    assert (part.verdict, part.reason, prepared) == (Verdict.NO_VERDICT, Reason.SCANNER_ERROR, None)
    assert message in part.detail and "part P1 (cam/P1.png)" in part.detail
    good, _ = inspector.inspect(_part(image, cloud, "P2"))
    assert good.reason in (Reason.OK, Reason.ANOMALY) and good.anomaly_map.shape == (SIZE, SIZE)


def test_pool_persists_and_a_pool_of_other_scan_settings_is_refused(toy_model, tmp_path, recent, good_scan):
    image, cloud = good_scan
    raw = scan_line_config("tcp://127.0.0.1:1", recent, tmp_path / "line", size=SIZE, model=toy_model)
    first = seeded_inspector(parse_config(raw), recent)
    first.save_pools()
    again = Inspector(parse_config(raw))
    assert again.restore_pools() == {"default": first.recipes["default"].pool.size} and again.recipes["default"].pool.ready
    a, b = first.inspect(_part(image, cloud))[0], again.inspect(_part(image, cloud))[0]
    assert a.raw_score == b.raw_score and a.score == b.score
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    raw["recipes"]["default"]["scan"]["n_groups"] = 200
    with pytest.raises(PoolMismatchError, match="scan"):
        Inspector(parse_config(raw)).restore_pools()


def test_a_pool_scored_with_another_image_distance_restores_and_is_scored_again(toy_model, tmp_path, recent, caplog):
    raw = scan_line_config("tcp://127.0.0.1:1", recent, tmp_path / "line", size=SIZE, model=toy_model)
    old = seeded_inspector(parse_config(raw), recent)                    # euclidean, as releases before it
    old.save_pools()
    stored = stored_identity(pool_path(old.config.storage.dir, "default"))
    assert "image_distance" not in stored["scan"]                        # the tokens serve either distance
    raw["recipes"]["default"]["scan"]["image_distance"] = "hellinger"
    new = Inspector(parse_config(raw))
    with caplog.at_level("WARNING"):
        assert new.restore_pools() == {"default": old.recipes["default"].pool.size}
    assert "scored with the euclidean image distance; scoring them again with hellinger" in caplog.text
    recipe, before = new.recipes["default"], old.recipes["default"].pool
    pool = recipe.pool
    assert pool.part_ids == before.part_ids and not np.allclose(pool.raw_scores, before.raw_scores, rtol=1e-3)
    restored = pool.raw_scores.copy(), pool.scale
    pool.rescore_members(recipe.scoring.grid, recipe.scoring.params)   # already scored as this line scores
    np.testing.assert_array_equal(pool.raw_scores, restored[0])
    assert pool.scale == restored[1] != before.scale
    new.save_pools()                                                     # stored now with its own distance
    caplog.clear()
    with caplog.at_level("WARNING"):
        Inspector(parse_config(raw)).restore_pools()
    assert "image distance" not in caplog.text


def test_a_hellinger_image_distance_needs_fpfh_tokens(toy_model, tmp_path, recent):
    raw = scan_line_config("tcp://127.0.0.1:1", recent, tmp_path / "line", size=SIZE, model=toy_model)
    raw["recipes"]["default"]["scan"].update(image_distance="hellinger", tokens="groups")
    with pytest.raises(ConfigError, match="recipes.default.scan.image_distance: hellinger compares FPFH histograms"):
        Inspector(parse_config(raw))


def test_a_reseed_without_clouds_fails_before_the_pool_changes_and_one_with_clouds_replaces_it(
        toy_model, tmp_path, recent):
    raw = scan_line_config("tcp://127.0.0.1:1", recent, tmp_path / "line", size=SIZE, model=toy_model)
    recipe = seeded_inspector(parse_config(raw), recent).recipes["default"]
    before = list(recipe.pool.part_ids[:recipe.pool.size])
    images = tmp_path / "images"
    images.mkdir()
    for image, _ in scans_in(recent)[:3]:
        shutil.copy(image, images / image.name)
    with pytest.raises(FileNotFoundError, match="no point cloud"):
        recipe.seed(recipe.read_seed(images), replace=True)
    assert recipe.pool.part_ids[:recipe.pool.size] == before and recipe.pool.ready
    recipe.pool.golden[0] = True
    assert recipe.seed(recipe.read_seed(recent), replace=True) == recipe.pool.size and recipe.pool.ready
    members = recipe.pool.part_ids[:recipe.pool.size]
    # The golden member stays, and its own file, seen again, is refused as its near-duplicate.
    assert before[0] in members and len(set(members)) == len(members) and recipe.pool.golden[:len(members)].sum() == 1
    assert recipe.rejected_duplicates >= 1 and all("/rgb/" in pid for pid in members)


def test_a_2d_image_pool_reseed_is_refused_for_a_scan_recipe(inspector, good_scan):
    from musc_edge.edge.runtime.recipes import Prepared

    part = _part(*good_scan).decide(Verdict.NO_VERDICT, Reason.WARMUP, "seed")
    with pytest.raises(ValueError, match="needs scans"):
        inspector.admit(part, Prepared([np.zeros((64, 32), np.float32)]))


# ---------------------------------------------------------------------------------------- the scan pool

@pytest.fixture(scope="module")
def samples():
    data = generate_set(7, seed=4, defect_fraction=0.0, size=64)
    params = Params3D(size=64, n_groups=48, group_size=16, normal_neighbours=6)
    return [prepare_3d(c, params) for c in data.clouds]


def test_scan_pool_warms_up_evicts_fifo_keeps_golden_and_excludes_the_part_itself(samples):
    pool = ScanPool("3d", capacity=4, n_sets=0, patches=0, dim=0, image_size=64, min_size=3, sigma=1.0)
    params = MuscParams()
    scan = [PreparedScan([], s) for s in samples]
    with pytest.raises(PoolTooSmallError):
        pool.score(scan[0], None, params)
    for i in range(3):
        pool.admit(f"p{i}", scan[i], 0.0, None, golden=i == 0)
    pool.rescore_members(None, params)
    assert pool.ready and (pool.raw_scores[:3] > 0).all() and np.abs(pool.features[:3]).sum() > 0
    itself, excluded = pool.score(scan[1], None, params), pool.score(scan[1], None, params, exclude_part_id="p1")
    assert (itself.n_refs, excluded.n_refs) == (3, 2)
    assert itself.raw < 0.05 * excluded.raw                    # a part matches itself: never score it so
    for i in range(3, 7):
        pool.admit(f"p{i}", scan[i], 0.1, np.ones(pool.features.shape[1], np.float32))
    assert pool.part_ids == ["p0", "p4", "p5", "p6"]          # FIFO over the non-golden members
    pool.remove(np.array([1]))
    assert pool.size == 3 and pool.part_ids[:3] == ["p0", "p5", "p6"]
    result = pool.score(scan[6], None, params, exclude_part_id="p6")
    assert type(result) is PoolScore and result.n_refs == 2 and result.map.shape == (64, 64)   # the 2D pool's type too (score.py)


def test_scan_pool_state_round_trip_keeps_the_newest_members(samples):
    params = MuscParams()
    big = ScanPool("3d", capacity=6, n_sets=0, patches=0, dim=0, image_size=64, min_size=3, sigma=1.0)
    for i, s in enumerate(samples[:6]):
        big.admit(f"p{i}", PreparedScan([], s), 0.0, None)
    big.rescore_members(None, params)
    small = ScanPool("3d", capacity=4, n_sets=0, patches=0, dim=0, image_size=64, min_size=3, sigma=1.0)
    small.load_state(big.state())
    assert small.size == 4 and small.part_ids == ["p2", "p3", "p4", "p5"]
    np.testing.assert_array_equal(small.raw_scores[:4], big.raw_scores[2:6])
    query = PreparedScan([], samples[6])
    reference = ScanPool("3d", capacity=4, n_sets=0, patches=0, dim=0, image_size=64, min_size=3, sigma=1.0)
    for i in range(2, 6):
        reference.admit(f"p{i}", PreparedScan([], samples[i]), big.raw_scores[i], big.features[i])
    np.testing.assert_array_equal(small.score(query, None, params).map, reference.score(query, None, params).map)
    small.rescore_members(None, params)                       # restored geometry still makes maps


# ------------------------------------------------------------------------------------ config and replay

MINIMAL = {"source": {"type": "replay", "path": "frames", "cloud_path": "../xyz/{stem}.tiff"}, "link": {"type": "zmq"}}


@pytest.mark.parametrize("patch, message", [
    ({"recipes": {"default": {"scan": {"n_groups": 64}}}}, "only used by recipes with modality 3d or 2d+3d"),
    ({"recipes": {"default": {"modality": "3d", "pool": {"eviction": "reservoir"}}}}, "fifo or coverage"),
    ({"recipes": {"default": {"modality": "2.5d"}}}, "recipes.default.modality"),
    ({"recipes": {"default": {"modality": "3d", "scan": {"scales": [0, 1]}}}}, "recipes.default.scan.scales"),
    ({"recipes": {"default": {"modality": "3d"}}, "source": {"type": "replay", "path": "frames"}},
     "source.cloud_path"),
    ({"recipes": {"default": {"modality": "2d+3d"}}, "source": {"type": "opencv", "device": 0}},
     "opencv camera delivers no point clouds"),
])
def test_bad_scan_configs_name_the_key(patch, message):
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, **patch})
    assert message in str(info.value)


def test_2d_recipes_dump_as_before_and_scan_defaults_match_the_numerics():
    recipe = parse_config(MINIMAL).recipes["default"]
    assert set(recipe.model_dump()) == {"threshold", "pool"}      # so 2D config hashes are unchanged
    scan = parse_config({**MINIMAL, "recipes": {"default": {"modality": "3d"}}}).recipes["default"].scan_settings
    defaults, pre = Params3D(), Params3D().preprocess
    assert (scan.n_groups, scan.group_size, scan.grouping, scan.normal_neighbours) == (
        defaults.n_groups, defaults.group_size, defaults.grouping, defaults.normal_neighbours)
    assert scan.preprocess.model_dump() == {k: getattr(pre, k) for k in scan.preprocess.model_dump()}


def test_scales_must_pair_with_the_2d_layers(toy_model, tmp_path, recent):
    raw = scan_line_config("tcp://127.0.0.1:1", recent, tmp_path, size=SIZE, model=toy_model)
    raw["recipes"]["default"]["scan"]["scales"] = [1.0]
    with pytest.raises(ValueError, match="recipes.default.scan.scales gives 1 3D layers .* 2 feature sets"):
        Inspector(parse_config(raw))


def test_replay_pairs_each_image_with_its_cloud(recent, tmp_path):
    source = ReplaySource(ReplayConfig(path=str(recent), pattern=SCAN_PATTERN, cloud_path=CLOUD_PATH, rate=None))
    with source:
        parts = list(source.parts())
    assert len(parts) == 10 and all(p.verdict is None for p in parts)
    first = parts[0]
    np.testing.assert_array_equal(first.cloud, read_cloud(Path(first.source_ref).parent.parent / "xyz" / "000.tiff"))

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "a.png").write_bytes(Path(first.source_ref).read_bytes())
    source = ReplaySource(ReplayConfig(path=str(lonely), cloud_path="{stem}.npy", rate=None))
    with source:
        (part,) = list(source.parts())
    assert (part.verdict, part.reason) == (Verdict.NO_VERDICT, Reason.SCANNER_ERROR)
    assert str(lonely / "a.npy") in part.detail and part.raw is not None


@pytest.mark.parametrize("cloud_path", ["xyz/cloud.tiff", "{nope}.npy", 3])
def test_replay_cloud_path_must_be_a_template(cloud_path):
    with pytest.raises(SourceConfigError, match="cloud_path"):
        ReplayConfig(path="frames", cloud_path=cloud_path)


def test_replay_cloud_path_needs_image_files(tmp_path):
    video = tmp_path / "v.avi"
    video.write_bytes(b"")
    config = ReplayConfig(path=str(video), cloud_path="{stem}.npy")
    with pytest.raises(SourceConfigError, match="needs image files"):
        ReplaySource(config).open()
