"""The TCP ports a line listens on, whether each is free to bind, and who holds one that is not.

Used before anything starts (``musc-edge run``, ``doctor``, the view): a line whose reject link, frame socket
or view cannot listen must not start looking healthy.
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


class PortUnavailable(RuntimeError):
    """A port a server must listen on cannot be bound; the message names the key, the port and its holder."""


@dataclass(frozen=True)
class ListenPort:
    """One address a line listens on; ``key`` is the config key that sets it."""

    key: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.key}: port {self.port} on {self.host}"


def _endpoint_port(key: str, endpoint: str) -> ListenPort | None:
    """``tcp://host:port`` / ``opc.tcp://host:port/path`` as a ListenPort; None for ipc://, a wildcard port, ..."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("tcp", "opc.tcp") or port is None:
        return None
    host = parts.hostname or "0.0.0.0"
    return ListenPort(key, "0.0.0.0" if host == "*" else host, port)


def line_ports(config, *, view: bool = True, telemetry: bool = True) -> list[ListenPort]:
    """The ports a line with this ``LineConfig`` listens on: its reject link (Modbus/TCP, OPC UA servers), a
    binding ZeroMQ frame source, and (when enabled) its view and Prometheus endpoint."""
    ports: list[ListenPort] = []
    link = config.link
    if link.type == "modbus-tcp":
        ports.append(ListenPort("link.port", link.host, link.port))
    elif link.type == "opcua" and (found := _endpoint_port("link.endpoint", link.endpoint)):
        ports.append(found)
    source = config.source
    if source.type == "zmq" and source.bind and (found := _endpoint_port("source.endpoint", source.endpoint)):
        ports.append(found)
    if view and config.view.enabled:
        ports.append(ListenPort("view.port", config.view.bind, config.view.port))
    prometheus = config.telemetry.prometheus
    if telemetry and prometheus.enabled:
        ports.append(ListenPort("telemetry.prometheus.port", prometheus.host, prometheus.port))
    return ports


def bind_problem(host: str, port: int) -> str | None:
    """None when ``host:port`` can be bound now (as a server binds it, with SO_REUSEADDR), else why not as a
    predicate ("in use by pid 12 (...)", "not permitted (...)", ...), naming the process that holds it where
    this user can see it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"not bindable: {host!r} is not an address of this machine ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                holder = port_holder(port)
                return "in use" + (f" by {holder}" if holder else " (by a process this user cannot see)")
            if exc.errno == errno.EACCES:
                return "not permitted (ports below 1024 need CAP_NET_BIND_SERVICE)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"not bindable: {host} is not an address of this machine"
            return f"not bindable: {exc.strerror or exc}"
    return None


def port_problems(ports: list[ListenPort]) -> list[str]:
    """One line per port that cannot be bound, naming the config key, the port and what holds it."""
    problems = []
    for p in ports:
        why = bind_problem(p.host, p.port)
        if why is not None:
            problems.append(f"{p} is {why}")
    return problems


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (Linux /proc/net/tcp and tcp6; empty elsewhere)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> str | None:
    """``pid N (command line)`` of the process listening on TCP ``port``, when /proc shows it to this user."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:   # gone, or another user's process
            continue
        if wanted & {_link(f"/proc/{pid}/fd/{fd}") for fd in fds}:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                command = ""
            return f"pid {pid} ({' '.join(command.split())[:120] or '?'})"
    return None


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:   # closed meanwhile
        return ""
