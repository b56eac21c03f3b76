"""`musc-edge eval`: report schema, overlays, bad input, and the foundation's numbers on real data."""
from __future__ import annotations

import json

import numpy as np
import pytest

from musc_edge.edge.cli import main
from musc_edge.edge.evaluation.runner import REPORT_KEYS, EvalSettings, run_eval
from musc_edge.edge.scoring import MuscParams


def test_report_schema_and_overlays(toy_model, synthetic_parts, tmp_path, capsys):
    report_path = tmp_path / "out" / "report.json"
    code = main(["eval", "--dataset", str(synthetic_parts), "--model", str(toy_model), "--mode", "stream",
                 "--pool", "12", "--min-pool", "6", "--report", str(report_path), "--overlays",
                 str(tmp_path / "overlays"), "--quiet"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert tuple(report) == REPORT_KEYS
    assert (report["mode"], report["size"], report["pool"]) == ("stream", 224, 12)
    assert (report["n_images"], report["n_anomalous"]) == (48, 12)
    for key in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pro"):
        assert 0.0 <= report[key] <= 100.0
    assert set(report["seconds"]) == {"features", "scoring", "total"}
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 48
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "pixel" in printed


def test_batch_and_stream_protocols_score_every_image(toy_model, synthetic_parts):
    for mode in ("batch", "stream"):
        report = run_eval(EvalSettings(synthetic_parts, mode=mode, model=toy_model, pool=10, min_pool=5,
                                       blocks=(6, 9), progress=False))
        assert report["n_images"] == 48 and report["image_auroc"] is not None


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "test" / "good" / "000.png").write_bytes(
        (root / "test" / "good" / "000.png").read_bytes()[:500]), "000.png"),
    (lambda root: next((root / "ground_truth").glob("*/*_mask.png")).unlink(), "mask"),
    (lambda root: [p.unlink() for p in (root / "test").glob("*/*.png")], "test"),
])
def test_bad_datasets_exit_2_naming_the_problem(toy_model, tmp_path, capsys, damage, message):
    from musc_edge.edge.synthetic import generate_set

    root = generate_set(tmp_path / "part", n=12, defect_fraction=0.25, seed=1, size=128)
    damage(root)
    assert main(["eval", "--dataset", str(root), "--model", str(toy_model), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err and "Traceback" not in err


def test_missing_dataset_and_model_are_clear_errors(toy_model, synthetic_parts, tmp_path, capsys):
    assert main(["eval", "--dataset", str(tmp_path / "nowhere"), "--model", str(toy_model), "--quiet"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["eval", "--dataset", str(synthetic_parts), "--model", str(tmp_path / "none.onnx"), "--quiet"]) == 2
    assert "none.onnx" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.slow
def test_bottle_batch_meets_the_foundation_targets(default_model, bottle):
    report = run_eval(EvalSettings(bottle, mode="batch", size=224, model=default_model, blocks=(6, 9),
                                   params=MuscParams(), progress=False))
    assert report["image_auroc"] >= 99.5
    assert report["pixel_auroc"] >= 97.5
    assert report["pixel_ap"] >= 74.0


@pytest.mark.data
@pytest.mark.slow
def test_bottle_stream_pool_40_meets_the_foundation_targets(default_model, bottle):
    report = run_eval(EvalSettings(bottle, mode="stream", size=224, pool=40, model=default_model, blocks=(6, 9),
                                   params=MuscParams(), progress=False))
    assert report["image_auroc"] >= 99.0
    assert report["pixel_auroc"] >= 97.0


def test_image_score_is_the_max_or_the_mean_of_the_top_k_patches():
    from musc_edge.edge.scoring import image_scores

    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 1, 1] = 1.0                                     # one hot patch: a speck
    maps[1, 2, :] = 0.6                                     # a thin line of four warm patches
    assert image_scores(maps).tolist() == pytest.approx([1.0, 0.6])
    assert image_scores(maps, top=4).tolist() == pytest.approx([0.25, 0.6])   # the line outranks the speck
    assert image_scores(maps, top=100).tolist() == pytest.approx([1 / 16, 2.4 / 16])


def test_eval_passes_the_image_score_rule_through_both_protocols(toy_model, synthetic_parts):
    for mode in ("batch", "stream"):
        reports = [run_eval(EvalSettings(synthetic_parts, mode=mode, model=toy_model, pool=10, min_pool=5,
                                         blocks=(6, 9), params=MuscParams(image_top=k), progress=False))
                   for k in (1, 8)]
        if mode == "batch":   # in stream mode the verdicts decide admission, so the pools (and maps) differ
            assert reports[0]["pixel_ap"] == reports[1]["pixel_ap"]      # same maps
        assert reports[0]["image_ap"] != reports[1]["image_ap"]          # other image scores


def test_eval_shows_progress_while_scoring_and_while_writing_overlays(toy_model, synthetic_parts, tmp_path, capsys):
    """Issue 25 row 10: features had a progress display, batch scoring and overlay writing had none."""
    code = main(["eval", "--dataset", str(synthetic_parts), "--model", str(toy_model), "--size", "112",
                 "--overlays", str(tmp_path / "overlays")])
    assert code == 0
    err = capsys.readouterr().err   # not a terminal: one line per tenth, the last one complete
    assert "scoring: 2/2 (" in err, err   # batch: one step per feature set (blocks 6 and 9)
    assert "overlays: 1/48 (" in err and "overlays: 48/48 (" in err, err


def test_line_mode_mixes_train_good_reports_batch_beside_it_and_writes_one_csv_row_per_image(
        toy_model, synthetic_parts, tmp_path):
    import csv
    import shutil

    category = tmp_path / "part"
    shutil.copytree(synthetic_parts, category)
    train = category / "train" / "good"
    train.mkdir(parents=True)
    for i, image in enumerate(sorted((category / "test" / "good").glob("*.png"))[:6]):
        shutil.copy(image, train / f"t{i:03d}.png")     # six more good parts, as a category's train/good
    scores = tmp_path / "scores.csv"
    code = main(["eval", "--dataset", str(category), "--model", str(toy_model), "--mode", "line", "--pool", "12",
                 "--min-pool", "6", "--scores", str(scores), "--report", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["mode"], report["n_images"], report["n_anomalous"]) == ("line", 54, 12)
    assert set(report["batch"]) >= {"image_auroc", "pixel_auroc", "pro"}
    from musc_edge.edge.config import LookAheadSettings

    assert report["line"]["look_ahead"] == LookAheadSettings().parts_at(report["line"]["rate"]) >= 1
    assert report["line"]["scale"] == "frozen" and report["line"]["warmup_parts"] >= 6
    with open(scores) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 54 and {r["split"] for r in rows} == {"train", "test"}
    assert sum(int(r["label"]) for r in rows) == 12 and all(int(r["refs"]) >= 5 for r in rows)
    threshold = report["line"]["label_free_threshold"]
    if threshold is not None:   # the verdict column is the score against the label-free threshold
        assert all((r["verdict"] == "REJECT") == (float(r["score"]) >= threshold) for r in rows)
    assert "orders" not in report["line"]       # one order unless asked


def test_line_mode_gives_each_order_the_image_auroc_its_own_seed_gives(toy_model, synthetic_parts, tmp_path, capsys):
    def line(*flags):
        argv = ["eval", "--dataset", str(synthetic_parts), "--model", str(toy_model), "--mode", "line", "--pool",
                "12", "--min-pool", "6", "--report", str(tmp_path / "r.json"), "--quiet", *flags]
        assert main(argv) == 0
        return json.loads((tmp_path / "r.json").read_text())

    report = line("--seed", "3", "--orders", "3")
    out = capsys.readouterr().out
    orders = report["line"]["orders"]
    assert orders["seeds"] == [3, 4, 5] and orders["image_auroc"][0] == round(report["image_auroc"], 2)
    # each order streams fresh parts through a fresh pool: scoring writes into a part (its nearest member), and
    # a part carried over from the last order changes admission
    assert orders["image_auroc"][2] == round(line("--seed", "5")["image_auroc"], 2)
    assert round(sum(orders["image_auroc"]) / 3, 2) == pytest.approx(orders["mean"], abs=0.01)
    assert f"image AUROC over 3 orders (seeds 3-5): mean {orders['mean']:.2f}, worst {orders['worst']:.2f}" in out


def test_line_mode_thins_defects_to_a_rate_and_refuses_its_options_elsewhere(toy_model, synthetic_parts, capsys):
    from musc_edge.edge.evaluation.line_protocol import line_samples

    thinned = line_samples(synthetic_parts, defect_rate=0.1, seed=1)
    assert sum(s.label for s in thinned) == 4 and len(thinned) == 40     # 36 good + 4 = 10 %
    assert line_samples(synthetic_parts, defect_rate=0.1, seed=1) == thinned
    assert main(["eval", "--dataset", str(synthetic_parts), "--model", str(toy_model), "--defect-rate", "0.1",
                 "--quiet"]) == 2
    assert "--mode line" in capsys.readouterr().err
    assert main(["eval", "--dataset", str(synthetic_parts), "--model", str(toy_model), "--orders", "4",
                 "--quiet"]) == 2
    assert "--orders belong to --mode line" in capsys.readouterr().err
