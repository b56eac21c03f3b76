"""CPU feature detection from /proc/cpuinfo text: what decides whether INT8 products are exact."""
from __future__ import annotations

from musc_edge.edge.cpu_features import cpu_features, parse_cpuinfo

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni
"""
XEON_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C
flags\t\t: fpu sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni
"""
SAPPHIRE_RAPIDS = XEON_VNNI.replace("avx512_vnni", "avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16")
SKYLAKE_X = XEON_VNNI.replace(" avx512_vnni", "")
ORIN = """processor\t: 0
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd42
"""


def test_avx2_only_cpu_needs_7_bit_weights():
    cpu = parse_cpuinfo(EPYC_AVX2, "x86_64")
    assert cpu.avx2 and cpu.fma and not (cpu.avx512 or cpu.vnni or cpu.amx)
    assert cpu.model == "AMD EPYC 7B12" and not cpu.int8_exact and cpu.int8_weight_levels == 63
    assert "7-bit" in cpu.summary() and cpu.names() == ["AVX2", "FMA"]


def test_avx512_without_vnni_saturates_like_avx2():
    cpu = parse_cpuinfo(SKYLAKE_X, "x86_64")
    assert cpu.avx512 and not cpu.vnni and not cpu.int8_exact


def test_vnni_and_amx_are_exact():
    vnni, amx = parse_cpuinfo(XEON_VNNI, "x86_64"), parse_cpuinfo(SAPPHIRE_RAPIDS, "x86_64")
    assert vnni.vnni and not vnni.amx and vnni.int8_exact and vnni.int8_weight_levels == 127
    assert amx.amx and amx.int8_exact and "AMX" in amx.names()


def test_arm64_reports_neon_and_dot_product():
    cpu = parse_cpuinfo(ORIN, "aarch64")
    assert cpu.neon and cpu.dotprod and not cpu.avx2 and cpu.int8_exact
    assert cpu.names() == ["NEON", "dot-product"] and cpu.as_dict()["machine"] == "aarch64"


def test_unreadable_cpuinfo_knows_nothing(tmp_path):
    cpu = cpu_features(tmp_path / "missing")
    assert cpu.names() in ([], ["NEON"]) and cpu.machine   # arm64 always has Advanced SIMD
    assert parse_cpuinfo("", "x86_64").int8_exact is False
