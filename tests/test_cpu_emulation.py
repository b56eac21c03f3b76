"""The AVX2-only CPU that ``tests/as_avx2_cpu.sh`` emulates is the one the INT8 choices are made for.

On this CPU class (no VNNI) ONNX Runtime's u8 x s8 kernels sum pairs of products in saturating 16-bit lanes: the
quantizer and the INT8 scorer use 7-bit references there (``CpuFeatures.int8_weight_levels``). These tests run
a probe under the emulator (qemu user mode, AMD EPYC-Rome: AVX2, FMA, no AVX-512) and check both halves of
that choice on the kernels ONNX Runtime really dispatches there: 63 levels are exact, 127 levels are not.
If a future ONNX Runtime stops saturating, the second test fails, and the 7-bit fallback can go.
``make test-avx2`` runs the CPU-dependent tests under the same emulator.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_onnx_msm import WORST_CASE

ROOT = Path(__file__).resolve().parents[1]
EMULATE = ROOT / "tests" / "as_avx2_cpu.sh"
PROBE = """
import json
from musc_edge.edge.cpu_features import cpu_features
from tests.test_onnx_msm import WORST_CASE, int8_product_check
cpu = cpu_features()
print(json.dumps({"features": cpu.names(), "int8_exact": cpu.int8_exact, "levels": cpu.int8_weight_levels,
                  "checks": {f"{levels} {inputs}": int8_product_check(levels, inputs)
                             for levels in (63, 127) for inputs in ("random", WORST_CASE)}}))
"""


def _emulator_problem() -> str | None:
    if shutil.which("qemu-x86_64") is None:
        return "qemu-x86_64 not installed (apt install qemu-user)"
    if os.uname().machine != "x86_64":
        return f"the emulator runs an x86-64 CPU on x86-64 hosts, this is {os.uname().machine}"
    ran = subprocess.run([str(EMULATE), "/bin/true"], capture_output=True, text=True, timeout=60)
    if ran.returncode != 0:
        return f"tests/as_avx2_cpu.sh cannot run here: {ran.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def avx2_probe() -> dict:
    problem = _emulator_problem()
    if problem:
        pytest.skip(problem)
    ran = subprocess.run([str(EMULATE), sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert ran.returncode == 0, ran.stderr[-2000:]
    return json.loads(ran.stdout.strip().splitlines()[-1])


def test_the_emulated_cpu_is_avx2_without_vnni(avx2_probe):
    assert avx2_probe["features"] == ["AVX2", "FMA"]
    assert not avx2_probe["int8_exact"] and avx2_probe["levels"] == 63


def test_seven_bit_references_are_exact_and_eight_bit_ones_saturate_there(avx2_probe):
    checks = avx2_probe["checks"]
    for inputs in ("random", WORST_CASE):
        assert all(exact for exact, _ in checks[f"63 {inputs}"]), checks
    # 2 x 255 x 127 > 32767: the pair sums clip, and the distances move by far more than rounding
    assert not any(exact for exact, _ in checks[f"127 {WORST_CASE}"]), checks
    assert min(error for _, error in checks[f"127 {WORST_CASE}"]) > 0.1
