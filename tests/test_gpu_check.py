"""bench/gpu_check.py's dry run: every stage on the CPU with a few small images, one JSON object out."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "dinov2_vits14_musc.onnx"


@pytest.fixture(scope="module")
def dry_run() -> dict:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not MODEL.is_file():
        pytest.skip(f"no default feature model at {MODEL} (make setup builds it)")
    from musc_edge.edge.manifest import load_manifest

    source = Path(load_manifest(MODEL, check_hash=False).source.get("path", ""))
    if not source.is_file():
        pytest.skip(f"the model's source graph {source} is not installed")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--images", "3",
                           "--repeat", "1", "--pools", "2,4"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_dry_run_measures_every_stage_on_the_cpu_and_says_so(dry_run):
    assert dry_run["device"].startswith("cpu") and dry_run["cuda"] is None
    assert dry_run["not_measured"] == []
    assert set(dry_run["features"]) == {"torch_fp32", "torch_fp16", "onnx_cpu"}
    assert set(dry_run["msm_one_vs_pool"]) == {"pool_2", "pool_4"}
    assert dry_run["verdicts"]["parts"] == 3


def test_the_pytorch_reference_matches_the_onnx_features(dry_run):
    # the same fp32 weights and arithmetic in another order: per-token cosine 1 to float32 rounding; fp16 keeps
    # 11 significant bits, so a token of 384 values drifts by ~1e-3 relative, a cosine of 1 - O(1e-6)
    for block in ("block6", "block9"):
        assert dry_run["features"]["torch_fp32"]["cosine_vs_onnx_cpu"][block]["min"] > 0.99999
        assert dry_run["features"]["torch_fp16"]["cosine_vs_onnx_cpu"][block]["min"] > 0.999


def test_torch_msm_scores_as_numpy_does(dry_run):
    # distances sqrt(2 - 2 cos) in [0, 2]: float32 products of 384 terms agree to ~1e-6, fp16 to ~1e-3
    for row in dry_run["msm_one_vs_pool"].values():
        assert row["torch_fp32_max_abs_diff_vs_numpy"] < 1e-4
        assert row["torch_fp16_max_abs_diff_vs_numpy"] < 2e-2
        assert row["torch_fp32_part_ms"] > row["torch_fp32_ms"] > 0


def test_a_check_without_cuda_reports_no_gpu_figure():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert "features" not in report and "msm_one_vs_pool" not in report
    assert any("cuda" in item["why"].lower() for item in report["not_measured"])
