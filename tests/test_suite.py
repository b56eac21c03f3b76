"""`musc-edge eval --suite DIR`: every category and modality under a folder, one table, one JSON."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from musc_edge.edge.cli import main
from musc_edge.edge.evaluation.suite import category_modalities, find_categories
from musc_edge.edge.synthetic import generate_set
from musc_edge.edge.synthetic3d import generate_set as generate_scans
from musc_edge.edge.synthetic3d import write_mvtec3d

SIZE = 112


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Two 2D categories in MVTec AD layout and one with point clouds in MVTec 3D-AD layout."""
    root = tmp_path_factory.mktemp("suite")
    generate_set(root / "plant_a" / "disc", n=16, defect_fraction=0.25, seed=1, size=SIZE)
    generate_set(root / "plant_a" / "washer", n=16, defect_fraction=0.25, seed=2, size=SIZE)
    write_mvtec3d(generate_scans(16, seed=5, defect_fraction=0.5, size=SIZE), root / "scans" / "gland")
    (root / "notes").mkdir()                       # a folder without categories is passed over
    return root


def test_categories_and_their_modalities_are_found(suite):
    found = find_categories(suite)
    assert [p.relative_to(suite).as_posix() for p in found] == ["plant_a/disc", "plant_a/washer", "scans/gland"]
    assert [category_modalities(p) for p in found] == [("2d",), ("2d",), ("2d", "3d", "2d+3d")]
    assert find_categories(suite / "plant_a" / "disc") == [suite / "plant_a" / "disc"]   # a category alone


@pytest.mark.slow
def test_suite_table_and_report_hold_every_run_with_mean_and_worst(toy_model, suite, tmp_path, capsys):
    report_path = tmp_path / "suite.json"
    code = main(["eval", "--suite", str(suite), "--model", str(toy_model), "--size", str(SIZE), "--groups", "64",
                 "--group-size", "32", "--report", str(report_path), "--quiet"])
    assert code == 0
    report = json.loads(report_path.read_text())
    runs = [(r["category"], r["modality"]) for r in report["runs"]]
    assert runs == [("plant_a/disc", "2d"), ("plant_a/washer", "2d"), ("scans/gland", "2d"), ("scans/gland", "3d"),
                    ("scans/gland", "2d+3d")]
    two_d = [r["report"] for r in report["runs"] if r["modality"] == "2d"]
    summary = report["summary"]["2d"]
    assert summary["categories"] == 3
    for key in ("image_auroc", "pixel_ap", "pro"):
        values = [r[key] for r in two_d]
        assert summary["mean"][key] == pytest.approx(np.mean(values))
        assert summary["worst"][key] == min(values)
        assert summary["worst_category"][key] == report["runs"][values.index(min(values))]["category"]
    assert set(report["summary"]) == {"2d", "3d", "2d+3d"}
    printed = capsys.readouterr().out
    assert "plant_a/washer" in printed and "mean (3)" in printed and "worst" in printed


def test_suite_in_line_mode_streams_every_category_with_its_batch_figure_beside(toy_model, suite, tmp_path):
    report_path = tmp_path / "suite.json"
    code = main(["eval", "--suite", str(suite), "--modality", "2d", "--mode", "line", "--pool", "12", "--min-pool",
                 "6", "--orders", "2", "--model", str(toy_model), "--size", str(SIZE), "--report", str(report_path),
                 "--quiet"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["mode"] == "line" and report["settings"]["pool"] == 12
    assert [r["category"] for r in report["runs"]] == ["plant_a/disc", "plant_a/washer", "scans/gland"]
    for run in (r["report"] for r in report["runs"]):
        assert (run["mode"], run["pool"]) == ("line", 12)
        assert set(run["batch"]) >= {"image_auroc", "pixel_auroc", "pro"}
        assert run["line"]["orders"]["seeds"] == [0, 1]


def test_a_broken_category_is_reported_and_the_suite_goes_on(toy_model, suite, tmp_path, capsys):
    root = tmp_path / "suite"
    shutil.copytree(suite / "plant_a", root / "plant_a")
    next((root / "plant_a" / "washer" / "ground_truth").glob("*/*_mask.png")).unlink()
    code = main(["eval", "--suite", str(root), "--model", str(toy_model), "--size", str(SIZE), "--quiet",
                 "--report", str(tmp_path / "r.json")])
    assert code == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert "report" in report["runs"][0] and "mask" in report["runs"][1]["error"]
    assert "error" in capsys.readouterr().out


def test_a_folder_without_categories_is_a_clear_error(toy_model, tmp_path, capsys):
    (tmp_path / "empty" / "x").mkdir(parents=True)
    assert main(["eval", "--suite", str(tmp_path / "empty"), "--model", str(toy_model), "--quiet"]) == 2
    assert "no category" in capsys.readouterr().err
