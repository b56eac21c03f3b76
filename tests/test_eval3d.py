"""`musc-edge eval --modality 3d | 2d+3d`: the MVTec 3D-AD tree the synthetic scanner writes, the report (same
schema as 2D), detection of geometric defects from the clouds, and bad clouds exiting 2 naming the file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from musc_edge.edge.cli import main
from musc_edge.edge.config import ScanSettings
from musc_edge.edge.evaluation.datasets import load_dataset, read_mask
from musc_edge.edge.evaluation.runner import REPORT_KEYS
from musc_edge.edge.evaluation.runner3d import Eval3DSettings, run_eval3d
from musc_edge.edge.pointcloud import read_cloud
from musc_edge.edge.synthetic3d import generate_set, write_mvtec3d

SIZE = 112
SCAN = ScanSettings(n_groups=256, group_size=32, normal_neighbours=8)      # MuSc-V2's groups scaled to 112 px
SCAN_FLAGS = ["--size", str(SIZE), "--groups", "256", "--group-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    data = generate_set(24, seed=5, defect_fraction=0.5, size=SIZE)
    return data, write_mvtec3d(data, tmp_path_factory.mktemp("scans") / "part")


def test_writer_makes_a_tree_the_mvtec_3d_ad_loader_reads_back_exactly(scans):
    data, root = scans
    samples = load_dataset(root)
    assert len(samples) == 24 and sum(s.label for s in samples) == 12
    for kind in set(data.kinds):
        of_kind = [s for s in samples if s.defect_type == kind]
        for sample, i in zip(of_kind, [i for i, k in enumerate(data.kinds) if k == kind]):
            assert sample.xyz_path == root / "test" / kind / "xyz" / f"{sample.path.stem}.tiff"
            np.testing.assert_array_equal(read_cloud(sample.xyz_path), data.clouds[i])   # NaN where missing
            np.testing.assert_array_equal(read_mask(sample.mask_path, SIZE), data.masks[i])


def test_3d_reports_have_the_2d_schema_and_find_the_defects(scans):
    _, root = scans
    reports = {mode: run_eval3d(Eval3DSettings(root, mode=mode, size=SIZE, pool=12, min_pool=6, modality="3d",
                                               scan=SCAN, progress=False)) for mode in ("batch", "stream")}
    for mode, report in reports.items():
        print(f"3d {mode}: image AUROC {report['image_auroc']:.1f}, pixel AUROC {report['pixel_auroc']:.1f}")
        assert tuple(report) == REPORT_KEYS
        assert (report["mode"], report["n_images"], report["n_anomalous"]) == (mode, 24, 12)
        assert report["image_auroc"] >= 75.0 and report["pixel_auroc"] >= 80.0
    assert reports["stream"]["pool"] == 12 and reports["batch"]["pool"] is None


def test_line_mode_reports_the_image_auroc_of_other_orders_each_as_its_own_seed_gives_it(scans):
    _, root = scans
    settings = Eval3DSettings(root, mode="line", size=SIZE, pool=12, min_pool=6, modality="3d", scan=SCAN,
                              progress=False, orders=3)
    orders = run_eval3d(settings)["line"]["orders"]
    alone = [run_eval3d(Eval3DSettings(root, mode="line", size=SIZE, pool=12, min_pool=6, modality="3d", scan=SCAN,
                                       progress=False, seed=seed))["image_auroc"] for seed in (0, 2)]
    assert orders["seeds"] == [0, 1, 2]
    # a fresh pool per order: nothing of one order's stream reaches the next
    assert orders["image_auroc"][0] == round(alone[0], 2) and orders["image_auroc"][2] == round(alone[1], 2)
    assert orders["worst"] <= orders["mean"] <= orders["best"]


def test_image_distance_flag_reaches_the_image_score_only_and_is_refused_for_2d(scans, synthetic_parts, tmp_path,
                                                                              capsys):
    _, root = scans
    reports = {}
    for distance in ("euclidean", "hellinger"):
        out = tmp_path / f"{distance}.json"
        assert main(["eval", "--dataset", str(root), "--modality", "3d", *SCAN_FLAGS, "--image-distance", distance,
                     "--report", str(out)]) == 0
        reports[distance] = json.loads(out.read_text())
    default = run_eval3d(Eval3DSettings(root, size=SIZE, modality="3d", progress=False,
                                        scan=ScanSettings(n_groups=256, group_size=32)))
    assert default["image_auroc"] == reports["euclidean"]["image_auroc"]          # euclidean by default
    assert reports["hellinger"]["image_auroc"] != reports["euclidean"]["image_auroc"]
    for key in ("pixel_auroc", "pixel_ap", "pro"):                               # the maps are the same
        assert reports["hellinger"][key] == reports["euclidean"][key]
    assert main(["eval", "--dataset", str(synthetic_parts), "--image-distance", "hellinger", "--quiet"]) == 2
    assert "--image-distance belongs to --modality 3d or 2d+3d" in capsys.readouterr().err


def test_cli_2d_plus_3d_stream_report_and_overlays(toy_model, scans, tmp_path, capsys):
    _, root = scans
    report_path = tmp_path / "report.json"
    code = main(["eval", "--dataset", str(root), "--modality", "2d+3d", "--mode", "stream", "--model",
                 str(toy_model), "--pool", "12", "--min-pool", "6", "--report", str(report_path), "--overlays",
                 str(tmp_path / "overlays"), *SCAN_FLAGS])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert tuple(report) == REPORT_KEYS and (report["mode"], report["size"], report["pool"]) == ("stream", SIZE, 12)
    assert all(0.0 <= report[k] <= 100.0 for k in ("image_auroc", "pixel_auroc", "pixel_ap", "pro"))
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 24
    assert "AUROC" in capsys.readouterr().out


def _first_cloud(root: Path) -> Path:
    return sorted(root.glob("test/*/xyz/*.tiff"))[0]      # bump/xyz/000.tiff: the first sample loaded


@pytest.mark.parametrize("damage, message", [
    (lambda root: shutil.rmtree(_first_cloud(root).parent), "has no xyz folder"),
    (lambda root: _first_cloud(root).unlink(), "missing point cloud"),
    (lambda root: _first_cloud(root).write_bytes(b"not a tiff"), "unreadable point cloud"),
    (lambda root: tifffile.imwrite(_first_cloud(root), np.zeros((SIZE, SIZE, 3), np.float32), photometric="rgb"),
     "no valid point"),
    (lambda root: tifffile.imwrite(_first_cloud(root), tifffile.imread(_first_cloud(root))[:50], photometric="rgb"),
     "paired image"),
])
def test_bad_clouds_exit_2_naming_the_file(scans, tmp_path, capsys, damage, message):
    root = shutil.copytree(scans[1], tmp_path / "part")
    named = str(root / "test" / "bump") if "folder" in message else _first_cloud(root).name
    damage(root)
    assert main(["eval", "--dataset", str(root), "--modality", "3d", *SCAN_FLAGS]) == 2
    err = capsys.readouterr().err
    assert message in err and named in err and "Traceback" not in err


def test_an_image_only_dataset_is_refused_for_3d(synthetic_parts, capsys):
    assert main(["eval", "--dataset", str(synthetic_parts), "--modality", "3d", *SCAN_FLAGS]) == 2
    assert "has no xyz folder" in capsys.readouterr().err


@pytest.mark.data
def test_the_shared_tire_category_has_no_clouds_and_says_so(tire, capsys):
    assert main(["eval", "--dataset", str(tire), "--modality", "2d+3d", *SCAN_FLAGS]) == 2
    err = capsys.readouterr().err
    assert "combined" in err and "xyz" in err and "Traceback" not in err


# ------------------------------------------------------------- the 3D encoder's exporter (musc-export pointmae)

def test_musc_export_pointmae_writes_the_requested_blocks(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from musc_edge.export.cli import main as export_main
    from musc_edge.export.pointmae import PointMAEEncoder

    torch.manual_seed(0)
    state = {f"module.MAE_encoder.{k}": torch.randn_like(v) * 0.05 if v.dtype.is_floating_point else v
             for k, v in PointMAEEncoder().state_dict().items()}
    checkpoint = tmp_path / "pointmae_pretrain.pth"
    torch.save({"base_model": state}, checkpoint)
    out = tmp_path / "pointmae.onnx"
    assert export_main(["pointmae", "--checkpoint", str(checkpoint), "--out", str(out), "--blocks", "2,4"]) == 0
    assert "blocks [2, 4]" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["tokens_block2", "tokens_block4"]
    groups, centres = np.zeros((1, 8, 16, 3), np.float32), np.zeros((1, 8, 3), np.float32)
    tokens = session.run(None, {"groups": groups, "centres": centres})
    assert tokens[0].shape == (1, 8, 384)

    assert export_main(["pointmae", "--checkpoint", str(tmp_path / "none.pth"), "--out", str(out)]) == 2
    assert "none.pth: no such checkpoint file" in capsys.readouterr().err
