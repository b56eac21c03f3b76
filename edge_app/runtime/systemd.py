"""systemd readiness and watchdog notifications (``Type=notify``, ``WatchdogSec=``), without a dependency.

The watchdog is fed from the scoring loop itself, so a hung engine call stops the pings and systemd
restarts the service; outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""
from __future__ import annotations

import os
import socket
import time


class SystemdNotifier:
    """Sends ``READY=1``, ``WATCHDOG=1`` (rate-limited) and ``STOPPING=1`` to ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None = None, min_interval_s: float = 1.0):
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if self.address.startswith("@"):  # abstract namespace
            self.address = "\0" + self.address[1:]
        self.min_interval_s = min_interval_s
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, state: str) -> None:
        if not self.enabled:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(state.encode(), self.address)
            except OSError:
                pass  # systemd gone (shutting down): nothing useful to do

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> None:
        """Ping the watchdog at most once per ``min_interval_s`` (call it from every loop iteration)."""
        now = time.monotonic()
        if now - self._last_ping >= self.min_interval_s:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1")
