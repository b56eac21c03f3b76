"""Serving the view: options from a line config, uvicorn on the configured address, at low CPU priority."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from ..config import LineConfig, ViewSettings
from .data import ViewOptions

NICENESS = 10   # the view yields the CPU to the line: on a busy device the page refreshes late, parts don't


def view_options(storage: Path, control_socket: Path | None, settings: ViewSettings, line_name: str) -> ViewOptions:
    """What the view reads and shows for a line whose files lie in ``storage``."""
    return ViewOptions(line_name=line_name, storage=Path(storage),
                       control_socket=Path(control_socket or Path(storage) / "control.sock"),
                       recent=settings.recent, histogram_parts=settings.histogram_parts, shifts=settings.shifts)


def options_from_config(config: LineConfig) -> ViewOptions:
    return view_options(config.storage.dir, config.control.socket, config.view, config.line.name)


def serve(options: ViewOptions, *, bind: str, port: int, refresh_s: float) -> None:
    """Serve the view until interrupted (blocks). ``PortUnavailable`` names the port and what holds it when
    it cannot be bound (before anything is printed as served)."""
    import uvicorn

    from ..ports import ListenPort, PortUnavailable, port_problems
    from .app import create_app

    problems = port_problems([ListenPort("view.port", bind, port)])
    if problems:
        raise PortUnavailable(problems[0])

    try:
        os.nice(NICENESS)
    except OSError:   # not permitted: serve at normal priority
        pass
    # Listen first, then say where: a client that connects as soon as the address is printed is queued by the
    # kernel until the server accepts, never refused.
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((bind, port))
    except OSError as exc:   # taken between the check above and now
        listening.close()
        raise PortUnavailable(f"view.port: {bind}:{port} cannot be bound: {exc}") from None
    listening.listen(128)
    where = "this machine only" if bind in ("127.0.0.1", "localhost", "::1") else "the network"
    print(f"musc-edge view: line {options.line_name!r} ({options.storage}) on http://{bind}:{port}/ "
          f"(read-only, reachable from {where})", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(options, refresh_s=refresh_s), log_level="warning", access_log=False,
                            server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[listening])
    except KeyboardInterrupt:   # Ctrl-C ends the view, as uvicorn.run() does
        pass
    finally:
        listening.close()
