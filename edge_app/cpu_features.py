"""Which CPU features the integer and float kernels of ONNX Runtime and numpy can use on this machine.

What matters for musc-edge's numbers:

- **x86-64 INT8** (ONNX Runtime's MLAS u8 x s8 kernels): with AVX-512 VNNI, AVX-VNNI or AMX the 8-bit
  products are accumulated straight into 32 bits (``vpdpbusd`` / tiles) and are exact. Without them (AVX2,
  or AVX-512 without VNNI) two adjacent u8 x s8 products are first summed into a saturating 16-bit lane
  (``vpmaddubsw``), which can clip when both operands use all 8 bits; ONNX Runtime's documented remedy is
  7-bit weights (``reduce_range``), for which 2 x 255 x 64 fits in 16 bits.
- **arm64 INT8**: the dot-product extension (``asimddp``: ``sdot``/``udot``) or widening multiplies
  accumulate in 32 bits; no saturation either way.
- **fp32**: AVX2 + FMA, AVX-512 or NEON change speed and the order of the rounding in a sum, never its
  error bound (see the tests' tolerances).

Pure parsing of ``/proc/cpuinfo`` text and ``platform.machine()``; no instruction is executed.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
_X86 = ("x86_64", "amd64", "i686", "i386")
_ARM64 = ("aarch64", "arm64")


@dataclass(frozen=True)
class CpuFeatures:
    """The features of one CPU that decide which kernels run (and whether INT8 products are exact)."""

    machine: str                 # platform.machine(): x86_64, aarch64, ...
    model: str                   # "model name" (x86) or "CPU part"/"Hardware" (arm); "" when unknown
    avx2: bool = False
    fma: bool = False
    avx512: bool = False         # AVX-512 foundation
    vnni: bool = False           # AVX-512 VNNI or AVX-VNNI: 8-bit dot products into 32 bits
    amx: bool = False            # AMX int8 tiles
    neon: bool = False           # arm64 Advanced SIMD (asimd)
    dotprod: bool = False        # arm64 8-bit dot product (asimddp)

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in _X86

    @property
    def is_arm64(self) -> bool:
        return self.machine.lower() in _ARM64

    @property
    def int8_exact(self) -> bool:
        """Whether ONNX Runtime's u8 x s8 products with full 8-bit weights are exact here (no 16-bit
        saturation). True on x86 with VNNI or AMX, and on arm64; False on other x86 (AVX2, AVX-512
        without VNNI) and on CPUs this module does not know."""
        if self.is_x86:
            return self.vnni or self.amx
        return self.is_arm64

    @property
    def int8_weight_levels(self) -> int:
        """Largest weight magnitude that is exact in ONNX Runtime's u8 x s8 kernels here: 127, or 63 (7-bit,
        ``reduce_range``) where a pair of products is summed in a saturating 16-bit lane."""
        return 127 if self.int8_exact else 63

    def names(self) -> list[str]:
        """The features present, by the names the tests and ``doctor`` print."""
        table = {"AVX2": self.avx2, "FMA": self.fma, "AVX-512": self.avx512, "VNNI": self.vnni, "AMX": self.amx,
                 "NEON": self.neon, "dot-product": self.dotprod}
        return [name for name, present in table.items() if present]

    def summary(self) -> str:
        """One line: machine, model, features and what that means for INT8."""
        int8 = "INT8 exact with 8-bit weights" if self.int8_exact else "INT8 needs 7-bit weights (no VNNI)"
        model = f" ({self.model})" if self.model else ""
        return f"{self.machine}{model}: {', '.join(self.names()) or 'no SIMD features found'}; {int8}"

    def as_dict(self) -> dict:
        """What a model's manifest records about the CPU that built it."""
        return {"machine": self.machine, "features": self.names(), "int8_exact": self.int8_exact}


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """The features listed in ``/proc/cpuinfo`` text (first processor's ``flags`` / ``Features`` line)."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "hardware") and not model:
            model = value.strip()
    x86 = machine.lower() in _X86
    arm = machine.lower() in _ARM64
    return CpuFeatures(
        machine=machine, model=model,
        avx2=x86 and "avx2" in flags, fma=x86 and "fma" in flags,
        avx512=x86 and "avx512f" in flags,
        vnni=x86 and bool({"avx512_vnni", "avx_vnni"} & flags),
        amx=x86 and "amx_int8" in flags,
        neon=arm and bool({"asimd", "neon"} & flags) or (arm and not flags),  # arm64 always has Advanced SIMD
        dotprod=arm and "asimddp" in flags)


def cpu_features(cpuinfo: Path = CPUINFO) -> CpuFeatures:
    """This machine's CPU features (none known when ``/proc/cpuinfo`` cannot be read, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text, platform.machine())
