#!/bin/sh
# Run a command as it would run on an AVX2-only x86-64 CPU (AMD EPYC Zen 2: AVX2 and FMA, no AVX-512, no
# VNNI), on any x86-64 machine: qemu user-mode emulation (Debian's qemu-user) with its EPYC-Rome model, so
# ONNX Runtime's MLAS and OpenBLAS pick their AVX2 kernels from CPUID exactly as they would there.
#   tests/as_avx2_cpu.sh .venv/bin/python -m pytest -q tests/test_onnx_msm.py      (what `make test-avx2` does)
# - qemu-user passes the host's /proc/cpuinfo through, which musc-edge reads (edge_app/cpu_features.py), so
#   the command sees a copy without the AVX-512, AVX-VNNI and AMX flags, bind-mounted in a private mount
#   namespace (needs root, or an unprivileged user namespace: `unshare -rm`).
# - numpy's own AVX2 kernels are switched off (NPY_DISABLE_CPU_FEATURES): under qemu 7.2 one of them
#   (np.argpartition) crashed. The tests that depend on the CPU check ONNX Runtime's and OpenBLAS's kernels,
#   which stay on AVX2.
# - About 45x slower than native: run the tests that depend on the CPU, not the whole suite. qemu first warns
#   about the EPYC-Rome features it does not emulate (none of them SIMD). A child process the command starts
#   runs natively (qemu-user does not follow exec); the tests `make test-avx2` runs start none.
set -eu
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
command -v qemu-x86_64 >/dev/null || { echo "$0: qemu-x86_64 not found (apt install qemu-user)" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || { echo "$0: emulates an x86-64 CPU on an x86-64 host only" >&2; exit 2; }
cpuinfo=$(mktemp "${TMPDIR:-/tmp}/cpuinfo-avx2.XXXXXX")
trap 'rm -f "$cpuinfo"' EXIT
sed -E '/^flags/ s/ (avx512[a-z_0-9]*|avx_vnni|amx[a-z_0-9]*)\b//g' /proc/cpuinfo > "$cpuinfo"
if [ "$(id -u)" = 0 ]; then isolate="unshare -m"; else isolate="unshare -rm"; fi
NPY_DISABLE_CPU_FEATURES=X86_V3 $isolate sh -c \
    'mount --bind "$0" /proc/cpuinfo && exec qemu-x86_64 -cpu EPYC-Rome "$@"' \
    "$cpuinfo" "$@"
