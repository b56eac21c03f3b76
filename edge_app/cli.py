"""``musc-edge``: the on-device command line."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError
from .manifest import ManifestError
from .scoring import MuscParams, PoolTooSmallError

if TYPE_CHECKING:
    from .config import ScanSettings


def _blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers, got {text!r}") from exc


def _at_least(low: int):
    """An argparse type: a whole number >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {value}")
        return value
    return parse


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a dataset category (MVTec AD / MVTec 3D-AD layout) and print metrics",
                       description="Without --dataset, a small synthetic inspection set (with point clouds for "
                                   "--modality 3d / 2d+3d) is generated and scored.")
    p.add_argument("--dataset", type=Path, help="category folder (e.g. ../shared/data/mvtec_ad/bottle)")
    p.add_argument("--suite", type=Path, help="score every category (and modality) under this folder, e.g. "
                   "../shared/data: one table with the mean and the worst category")
    p.add_argument("--mode", choices=("batch", "stream", "line"), default="batch",
                   help="batch: each image against all others (the papers); stream: against a FIFO pool of earlier "
                        "images; line: as a line meets the category (train/good mixed into test, the line's pool "
                        "and look-ahead), with the batch figure on the same images")
    p.add_argument("--scores", type=Path, metavar="FILE",
                   help="line mode: per-image CSV (image, label, defect type, score, verdict at the label-free "
                        "threshold, references)")
    p.add_argument("--defect-rate", type=float, metavar="R",
                   help="line mode: thin the defective images to this share of the stream, e.g. 0.1")
    p.add_argument("--rate", type=float, default=4.0, metavar="PARTS_PER_S",
                   help="line mode: the line's rate, which sets how many later parts the look-ahead gets (default 4)")
    p.add_argument("--orders", type=_at_least(1), default=1, metavar="N",
                   help="line mode: stream the same images in N seeded orders (--seed, --seed + 1, ...) and report "
                        "the image AUROC's mean and worst; on a few dozen parts the order alone moves it by points")
    p.add_argument("--modality", choices=("2d", "3d", "2d+3d"),
                   help="score images (default), point clouds (MVTec 3D-AD xyz/*.tiff) or both fused (MuSc-V2); "
                        "with --suite, default: every modality a category has")
    p.add_argument("--groups", type=int, default=1024, help="3d / 2d+3d: point groups per part")
    p.add_argument("--group-size", type=int, default=128, help="3d / 2d+3d: points per group")
    p.add_argument("--image-distance", choices=("euclidean", "hellinger"),
                   help="3d / 2d+3d: how the image score compares 3D tokens (scan.image_distance, default "
                        "euclidean)")
    p.add_argument("--size", type=_at_least(1), default=224, help="input resolution (multiple of the patch size)")
    p.add_argument("--fit", choices=("tile", "pad", "squash"), default="tile",
                   help="non-square images: tile the long side at full scale, pad (letterbox), or squash")
    p.add_argument("--pool", type=_at_least(2), default=40, help="stream and line modes: rolling pool capacity")
    p.add_argument("--min-pool", type=_at_least(2), default=10,
                   help="stream and line modes: pool size before scoring starts")
    p.add_argument("--seed", type=int, default=0, help="stream and line modes: shuffle seed (line: the stream's order)")
    p.add_argument("--model", type=Path, help="feature model (.onnx with manifest); default models/...")
    p.add_argument("--blocks", type=_blocks, default=(), help="blocks to score, e.g. 6,9 (default: scoring default)")
    p.add_argument("--aggregation", choices=("snamd", "snamd-raw", "lnamd", "none"), default="snamd")
    p.add_argument("--rescore", type=_blocks, default=(1,), metavar="WINDOWS",
                   help="RsCon windows, e.g. 1,7 (MuSc-V2); default 1 = normalisation only")
    p.add_argument("--rescore-feature", choices=("salient", "image_token"), default="salient")
    p.add_argument("--image-top", type=_at_least(1), default=1, metavar="K",
                   help="image score: max of the map (1, default) or mean of its K highest patch scores")
    p.add_argument("--report", type=Path, help="write the metrics JSON here")
    p.add_argument("--overlays", type=Path, help="write heat-map overlays into this folder")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .evaluation.runner import DEFAULT_BLOCKS, EvalSettings, format_report, run_eval

    if args.suite is not None:
        return _eval_suite(args)
    args.modality = args.modality or "2d"
    dataset = args.dataset
    if dataset is None:
        dataset = Path(tempfile.mkdtemp(prefix="musc-synthetic-")) / "synthetic_part"
        if args.modality == "2d":
            from .synthetic import generate_set

            generate_set(dataset, n=48, defect_fraction=0.25, seed=args.seed)
        else:
            from .synthetic3d import generate_set as generate_scans
            from .synthetic3d import write_mvtec3d

            write_mvtec3d(generate_scans(48, seed=args.seed, defect_fraction=0.25, size=args.size), dataset)
        print(f"generated a synthetic inspection set in {dataset}", file=sys.stderr)
        if args.overlays is None:
            args.overlays = Path("runs") / "overlays"
    common = dict(dataset=dataset, mode=args.mode, size=args.size, pool=args.pool, min_pool=args.min_pool,
                  seed=args.seed, model=args.model, blocks=args.blocks or DEFAULT_BLOCKS,
                  params=MuscParams(aggregation=args.aggregation, windows=args.rescore,
                                    rescore_feature=args.rescore_feature, image_top=args.image_top),
                  overlays=args.overlays, scores=args.scores, defect_rate=args.defect_rate, rate=args.rate,
                  orders=args.orders, threads=args.threads, progress=not args.quiet, fit=args.fit)
    if args.mode != "line" and (args.scores or args.defect_rate is not None or args.orders > 1):
        raise UsageError("--scores, --defect-rate and --orders belong to --mode line")
    if args.modality == "2d":
        if args.image_distance:
            raise UsageError("--image-distance belongs to --modality 3d or 2d+3d")
        report = run_eval(EvalSettings(**common))
    else:
        from .evaluation.runner3d import Eval3DSettings, run_eval3d

        report = run_eval3d(Eval3DSettings(**common, modality=args.modality, scan=_scan_settings(args)))
    print(format_report(report))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.report}", file=sys.stderr)
    if args.overlays:
        print(f"overlays written to {args.overlays}/", file=sys.stderr)
    if args.scores:
        print(f"per-image scores written to {args.scores}", file=sys.stderr)
    return 0


def _scan_settings(args: argparse.Namespace) -> ScanSettings:
    """The 3D settings eval's flags give (UsageError naming the flags for a bad value)."""
    from pydantic import ValidationError

    from .config import ScanSettings

    try:
        return ScanSettings(n_groups=args.groups, group_size=args.group_size,
                            image_distance=args.image_distance or "euclidean")
    except ValidationError as exc:
        raise UsageError(f"--groups / --group-size: {exc.errors()[0]['msg']}") from None


def _eval_suite(args) -> int:
    from .evaluation.runner import DEFAULT_BLOCKS, EvalSettings
    from .evaluation.suite import SuiteSettings, format_suite, run_suite

    if args.dataset is not None:
        raise UsageError("--suite and --dataset exclude each other")
    if args.overlays is not None:
        raise UsageError("--overlays is per category: use --dataset")
    scan = _scan_settings(args)
    template = EvalSettings(args.suite, mode=args.mode, size=args.size, fit=args.fit, pool=args.pool,
                            min_pool=args.min_pool, seed=args.seed, model=args.model,
                            blocks=args.blocks or DEFAULT_BLOCKS,
                            params=MuscParams(aggregation=args.aggregation, windows=args.rescore,
                                              rescore_feature=args.rescore_feature, image_top=args.image_top),
                            orders=args.orders, threads=args.threads, progress=not args.quiet)
    if args.mode != "line" and args.orders > 1:
        raise UsageError("--orders belongs to --mode line")
    modalities = (args.modality,) if args.modality else ("2d", "3d", "2d+3d")
    report = run_suite(SuiteSettings(args.suite, template, scan, modalities))
    print(format_suite(report))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.report}", file=sys.stderr)
    return 1 if any("error" in r for r in report["runs"]) else 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a line (default: the simulated line, no hardware needed)",
                       description="Without --config: synthetic parts replayed on a simulated conveyor, inspected "
                                   "by the full runtime and signalled over ZeroMQ to an in-process PLC simulator.")
    p.add_argument("--config", type=Path, help="line config (YAML); see deploy/*.yaml")
    p.add_argument("--3d", dest="scans", action="store_true",
                   help="simulated line: scanned parts (image + point cloud) scored by a 2d+3d recipe")
    p.add_argument("--parts", type=int, help="simulated line: number of parts (default 60, 40 with --3d)")
    p.add_argument("--rate", type=float, help="simulated line: parts per second (default 4, 1 with --3d)")
    p.add_argument("--seed", type=int, default=0, help="simulated line: seed of the generated parts")
    p.add_argument("--workdir", type=Path, help="simulated line: where parts, ledger and archive go")
    p.add_argument("--model", type=Path, help="simulated line: feature model (default models/...)")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    if args.config is None:
        from .runtime.simulated import run_simulated_line, run_simulated_scan_line

        if args.scans:
            return run_simulated_scan_line(args.workdir, args.parts or 40, args.rate or 1.0, args.seed, args.model)
        return run_simulated_line(args.workdir, args.parts or 60, args.rate or 4.0, args.seed, args.model)
    if args.scans:
        raise UsageError("--3d selects the simulated 2D+3D line; with --config, set the recipe's modality instead")
    import signal

    from .config import load_config
    from .runtime.line import Line
    from .runtime.simulated import _status_printer

    config = load_config(args.config)
    from .ports import line_ports, port_problems
    from .runtime.line import LineStopped, StartupError

    # Every port first (the line checks its own again when it starts): a line that cannot signal or be
    # watched must not start and look healthy.
    problems = port_problems(line_ports(config, telemetry=False))
    if problems:
        print(f"musc-edge run: cannot start: {problems[0]}", file=sys.stderr)
        return 3
    view = None
    try:
        line = Line(config, status=_status_printer())
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: line.stop())
        view = _start_view(args.config) if config.view.enabled else None
        if view is not None:
            _alarm_when_view_ends(view, line)
        stats = line.run()
    except StartupError as exc:
        print(f"musc-edge run: cannot start: {exc}", file=sys.stderr)
        return 3
    except LineStopped as exc:  # e.g. disk full: one clear line, nothing lost, no traceback
        print(f"\nmusc-edge run: line stopped: {exc}", file=sys.stderr)
        return 3
    except _input_errors():   # a bad config, pool or calibration file: one line naming it, exit 2 (main)
        raise
    except Exception as exc:   # a fault the runtime did not foresee: one line, non-zero (systemd restarts it)
        print(f"\nmusc-edge run: line stopped by an internal fault: {type(exc).__name__}: "
              f"{' '.join(str(exc).split())[:300]} (traceback: {_save_traceback(config.storage.dir)})",
              file=sys.stderr)
        return 4
    finally:
        if view is not None:
            view.terminate()
            view.wait(timeout=10)
    print(file=sys.stderr)
    if line.ended:
        print(f"musc-edge run: {line.ended}", file=sys.stderr)
    print(line.status_line())
    if not stats.parts:
        print(f"musc-edge run: no part was inspected; alarms: {'; '.join(stats.alarms) or 'none'}", file=sys.stderr)
        return 1
    return 0


def _save_traceback(storage: Path) -> str:
    """The current exception's traceback written to ``storage/last-fault.txt``; where it went, or why not."""
    import traceback

    path = Path(storage) / "last-fault.txt"
    try:
        path.write_text(traceback.format_exc())
    except OSError as exc:
        return f"not saved: {exc.strerror}"
    return str(path)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="counters and latency of a line, read from its ledger")
    p.add_argument("--config", type=Path, help="line config (its storage.dir holds the ledger)")
    p.add_argument("--dir", type=Path, help="storage directory of the line (instead of --config)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)


def cmd_status(args) -> int:
    from .runtime.status import line_status, format_status

    if (args.config is None) == (args.dir is None):
        raise UsageError("give exactly one of --config or --dir")
    control_socket = None
    if args.config:
        from .config import load_config

        config = load_config(args.config)
        storage, control_socket = config.storage.dir, config.control.socket
    else:
        storage = args.dir
    status = line_status(storage, control_socket)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _add_view(sub) -> None:
    p = sub.add_parser("view", help="read-only operator view in the browser (counters, rejects, histogram, health)",
                       description="Serves the line's live counters, recent rejects with their overlays, the score "
                                   "histogram, latency and link/pool/alarm health. Read-only; a separate process "
                                   "that reads the ledger, the archive and the control socket.")
    p.add_argument("--config", type=Path, help="line config (its storage.dir and view: block)")
    p.add_argument("--dir", type=Path, help="storage directory of the line (instead of --config)")
    p.add_argument("--bind", help="listen address (default view.bind, 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="listen port (default view.port, 8750)")
    p.set_defaults(func=cmd_view)


def cmd_view(args) -> int:
    from .config import ViewSettings, load_config
    from .view.server import options_from_config, serve, view_options

    if (args.config is None) == (args.dir is None):
        raise UsageError("give exactly one of --config or --dir")
    if args.config:
        config = load_config(args.config)
        settings, options = config.view, options_from_config(config)
    else:
        settings = ViewSettings()
        options = view_options(args.dir, None, settings, args.dir.name)
    from .ports import PortUnavailable

    try:
        serve(options, bind=args.bind or settings.bind, port=args.port or settings.port, refresh_s=settings.refresh_s)
    except PortUnavailable as exc:
        print(f"musc-edge view: cannot start: {exc}", file=sys.stderr)
        return 3
    return 0


def _start_view(config_path: Path):
    """The companion view process of ``run`` (a separate process: it can never slow the hot path)."""
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "musc_edge.edge.cli", "view", "--config", str(config_path)])


def _alarm_when_view_ends(view, line) -> None:
    """A line alarm when the companion view process ends while the line runs (the operator screen is gone)."""
    import threading

    def watch() -> None:
        code = view.wait()
        line.raise_alarm(f"operator view stopped (exit {code}); the line runs on without it")
    threading.Thread(target=watch, name="view-watch", daemon=True).start()


def _add_pool(sub) -> None:
    p = sub.add_parser("pool", help="seed a stopped line's pool from a folder of recent good captures "
                                    "(technician; a running line: musc-calibrate pool reseed)")
    p.add_argument("action", choices=("seed",))
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--recipe", default="default")
    p.add_argument("--reason", required=True, help="why (recorded in the audit log; required)")
    p.set_defaults(func=cmd_pool)


def cmd_pool(args) -> int:
    from .config import load_config
    from .runtime.seed import seed_offline

    config = load_config(args.config)
    size = seed_offline(config, args.recipe, args.folder, args.reason)
    print(f"pool {args.recipe!r}: {size} members, saved under {config.storage.dir}/pools/ (recorded in the audit log)")
    return 0


def _add_doctor(sub) -> None:
    # Listed for --help only: main() hands `doctor ...` to musc_edge.edge.doctor.doctor_main.
    sub.add_parser("doctor", help="check this device and a line config before going live "
                                  "(musc-edge doctor --config LINE.yaml)", add_help=False)


def _add_plc_sim(sub) -> None:
    # Listed for --help only: main() hands `plc-sim ...` to musc_edge.edge.plc_sim.main, which owns its options.
    sub.add_parser("plc-sim", help="PLC simulator: the other end of a serial, ZeroMQ, Modbus or OPC UA reject link "
                                   "(musc-edge plc-sim --help)", add_help=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musc-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_eval(sub)
    _add_status(sub)
    _add_view(sub)
    _add_pool(sub)
    _add_plc_sim(sub)
    _add_doctor(sub)
    return parser


def _input_errors() -> tuple[type[Exception], ...]:
    """What bad input (options, config, data, model files) raises: shown as one line, exit code 2."""
    from .config import ConfigError
    from .evaluation.datasets import DatasetError
    from .evaluation.metrics import MetricsError
    from .mediaio import MediaError
    from .pointcloud import CloudError
    from .runtime.calibration_state import CalibrationError
    from .runtime.pool_store import PoolMismatchError
    from .sources.base import SourceConfigError

    return (UsageError, ConfigError, DatasetError, MetricsError, MediaError, CloudError, CalibrationError,
            SourceConfigError, ManifestError, PoolMismatchError, PoolTooSmallError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plc-sim"]:
        from .plc_sim import main as plc_sim_main

        return plc_sim_main(argv[1:])
    if argv[:1] == ["doctor"]:
        from .doctor import doctor_main

        return doctor_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _input_errors() as exc:   # anything else is a bug: it ends with its traceback
        print(f"musc-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
