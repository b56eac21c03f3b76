"""``musc-edge plc-sim``: play the PLC end of any reject link (docs/wire-protocol.md).

``--link serial|zmq``: the framed simulator (framed.py) answers the runtime's messages. ``--link
modbus-tcp|modbus-rtu|opcua``: the runtime is the server, so the simulated PLC is a client (modbus.py, opcua.py)
that connects to its port, serial device or endpoint and scans, as a PLC would. Each family has its own options;
``--help`` lists every link.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from musc_edge.edge.plc_sim.base import FRAMED_LINKS, PLANT_LINKS, counter_line, serve_and_report


def is_plant_link(argv: list[str]) -> bool:
    """True when ``argv`` asks for one of :data:`PLANT_LINKS` (``--link X`` or ``--link=X``)."""
    for i, arg in enumerate(argv):
        if arg == "--link" and i + 1 < len(argv):
            return argv[i + 1] in PLANT_LINKS
        if arg.startswith("--link="):
            return arg.split("=", 1)[1] in PLANT_LINKS
    return False


def _framed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musc-edge plc-sim", description="Play the PLC end of a reject link (docs/wire-protocol.md).",
        epilog="The options below are those of serial and zmq; modbus-tcp, modbus-rtu and opcua have their own: "
               "musc-edge plc-sim --link modbus-tcp --help")
    parser.add_argument("--link", choices=(*FRAMED_LINKS, *PLANT_LINKS), required=True,
                        help="the link type the runtime's config names (link.type)")
    parser.add_argument("--url", help="serial: pyserial URL or device; 'pty' creates a pseudo-terminal "
                                      "and prints the path for the runtime's link.url")
    parser.add_argument("--baudrate", type=int, default=115200)
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5557", help="zmq: ROUTER bind endpoint")
    parser.add_argument("--log", type=Path, help="append every received verdict (once) as a JSON line")
    parser.add_argument("--report-every", type=float, default=10.0, metavar="SECONDS",
                        help="print the counters this often (0: only at exit)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="answer this late")
    parser.add_argument("--corrupt-rate", type=float, default=0.0, help="share of frames to damage, 0..1")
    parser.add_argument("--seed", type=int, default=0, help="seed for --corrupt-rate")
    parser.add_argument("--silent-after", type=int, metavar="N", help="stop answering after N verdicts")
    parser.add_argument("--silent-for", type=float, default=5.0, metavar="SECONDS",
                        help="how long --silent-after stays silent")
    parser.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                        help="exit after this long (0: run until Ctrl-C)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``musc-edge plc-sim``: run a simulator until Ctrl-C or --duration; 0 on a clean exit."""
    argv = sys.argv[1:] if argv is None else argv
    if is_plant_link(argv):                            # Modbus / OPC UA: their own options
        return _plant_main(argv)
    args = _framed_parser().parse_args(argv)
    if args.link == "serial" and not args.url:
        print("plc-sim: --link serial needs --url (a device, a pyserial URL, or 'pty')", file=sys.stderr)
        return 2
    options = dict(delay_s=args.delay, corrupt_rate=args.corrupt_rate, seed=args.seed,
                   silent_after=args.silent_after, silent_for_s=args.silent_for, log_path=args.log)
    from musc_edge.edge.plc_sim.framed import PlcSimulator

    try:
        if args.link == "zmq":
            sim = PlcSimulator.on_zmq(args.endpoint, **options)
        elif args.url == "pty":
            sim = PlcSimulator.on_pty(**options)
        else:
            sim = PlcSimulator.on_serial(args.url, args.baudrate, **options)
    except (ValueError, OSError) as exc:
        print(f"plc-sim: {exc}", file=sys.stderr)
        return 2
    print(f"plc-sim: {args.link} PLC listening on {sim.address}", flush=True)
    sim.on_stop_line = lambda reason: print(f"plc-sim: STOP LINE requested: {reason}", flush=True)
    serve_and_report(sim, args.duration, args.report_every, lambda: counter_line(sim.counters()))
    return 0


def _plant_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musc-edge plc-sim",
                                     description="Play the PLC (a Modbus or OPC UA client) against the runtime's "
                                                 "server (docs/wire-protocol.md).",
                                     epilog="serial and zmq have their own options: musc-edge plc-sim --link zmq --help")
    parser.add_argument("--link", choices=(*FRAMED_LINKS, *PLANT_LINKS), required=True,
                        help="the link type the runtime's config names (link.type)")
    parser.add_argument("--host", default="127.0.0.1", help="modbus-tcp: the runtime's address")
    parser.add_argument("--port", help="modbus-tcp: TCP port (default 502); modbus-rtu: serial device, or 'pty' "
                                       "to create a pty pair and print the end for the runtime's link.port")
    parser.add_argument("--unit-id", type=int, default=1, help="modbus-rtu: the runtime's slave address")
    parser.add_argument("--baudrate", type=int, default=19200)
    parser.add_argument("--parity", choices=("N", "E", "O"), default="E", help="modbus-rtu (a pty needs N)")
    parser.add_argument("--endpoint", default="opc.tcp://127.0.0.1:4840/musc-edge/", help="opcua: server endpoint")
    parser.add_argument("--username", default="plc", help="opcua login")
    parser.add_argument("--password-env", default="MUSC_PLC_PASSWORD", metavar="VAR",
                        help="opcua: environment variable holding the password")
    parser.add_argument("--security", choices=("encrypt", "none"), default="encrypt",
                        help="opcua: Basic256Sha256 SignAndEncrypt (default) or none (a server with "
                             "allow_unencrypted: true)")
    parser.add_argument("--source-address", metavar="IP", help="modbus-tcp: connect from this local address")
    parser.add_argument("--scan", type=float, metavar="SECONDS",
                        help="PLC scan period (default: Modbus 0.01, OPC UA 0.02)")
    parser.add_argument("--log", type=Path, help="append every received verdict (once) as a JSON line")
    parser.add_argument("--report-every", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="acknowledge this late")
    parser.add_argument("--corrupt-rate", type=float, default=0.0, help="share of acks written damaged, 0..1")
    parser.add_argument("--refuse", type=int, default=0, metavar="N", help="NAK (busy) the first N verdicts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--silent-after", type=int, metavar="N", help="stop scanning after N verdicts")
    parser.add_argument("--silent-for", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--duration", type=float, default=0.0, metavar="SECONDS", help="0: until Ctrl-C")
    return parser


def _plant_main(argv: list[str]) -> int:
    """The Modbus and OPC UA PLCs: clients of the runtime's server."""
    args = _plant_parser().parse_args(argv)
    options = dict(delay_s=args.delay, corrupt_rate=args.corrupt_rate, seed=args.seed,
                   silent_after=args.silent_after, silent_for_s=args.silent_for, log_path=args.log)
    if args.scan is not None:
        options["scan_s"] = args.scan
    pair = None
    try:
        if args.link == "modbus-tcp":
            from musc_edge.edge.plc_sim.modbus import ModbusPlcSimulator

            sim = ModbusPlcSimulator.on_tcp(args.host, int(args.port or 502), source_address=args.source_address,
                                            **options)
        elif args.link == "modbus-rtu":
            from musc_edge.edge.plc_sim.modbus import ModbusPlcSimulator, PtyPair

            if not args.port:
                print("plc-sim: --link modbus-rtu needs --port (a serial device or 'pty')", file=sys.stderr)
                return 2
            port = args.port
            if port == "pty":
                pair = PtyPair()
                port = pair.b
                print(f"plc-sim: runtime end of the pty pair: {pair.a} (link.port; parity N)", flush=True)
            sim = ModbusPlcSimulator.on_rtu(port, unit_id=args.unit_id, baudrate=args.baudrate,
                                            parity="N" if pair else args.parity, **options)
        else:
            from musc_edge.edge.plc_sim.opcua import OpcUaPlcSimulator

            password = os.environ.get(args.password_env)
            if password is None:
                print(f"plc-sim: set {args.password_env} to the OPC UA password of {args.username!r}",
                      file=sys.stderr)
                return 2
            sim = OpcUaPlcSimulator(args.endpoint, args.username, password, security=args.security, **options)
    except (ValueError, OSError) as exc:
        print(f"plc-sim: {exc}", file=sys.stderr)
        return 2
    if args.refuse:
        sim.refuse_next(args.refuse)
    print(f"plc-sim: {args.link} PLC scanning {sim.address} every {sim.scan_s * 1000:.0f} ms", flush=True)
    try:
        serve_and_report(sim, args.duration, args.report_every, lambda: _counters(sim))
    finally:
        if pair is not None:
            pair.close()
    return 0


def _counters(sim) -> str:
    counters = asdict(sim.counters()) | {"stop_requests": sim.stop_requests, "link_errors": sim.link_errors}
    return " ".join(f"{key}={value}" for key, value in counters.items())
