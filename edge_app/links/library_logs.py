"""The protocol libraries' log messages, mapped to ours and rate-limited.

pymodbus logs every failed connection attempt at ERROR ("Connection to (host, port) failed: [Errno 111]
Connection refused", then "Repeating...."), appends its last 20 frames as raw hex to every error, and reports
a peer that went away mid-frame as an error too. A line that waits for its PLC, or a PLC simulator that waits
for the runtime, would print hundreds of such lines and hide the alarms that matter. :func:`quiet_pymodbus`
replaces that output with one line per kind of message, in our words, at most every ``interval_s`` seconds
(with the number held back); the raw hex stays at DEBUG. asyncua's server logs every refused request (a rogue
client's writes: hundreds a second) at ERROR: :func:`quiet_asyncua` lets each distinct message through once per
interval; the ``foreign_writer`` alarm is what reports the refusals.
"""
from __future__ import annotations

import logging
import re
import threading
import time

log = logging.getLogger("musc_edge.edge.links.modbus")

_MAPPED: tuple[tuple[re.Pattern[str], str, int], ...] = (
    (re.compile(r"Connection to \(([^,]+), (\d+)\) failed: (.*)"),
     "Modbus server {0}:{1} not reachable ({2}); retrying", logging.WARNING),
    (re.compile(r"Failed to connect (.*)"), "Modbus connection failed ({0}); retrying", logging.WARNING),
    (re.compile(r"Failed to start server (.*)"), "Modbus server cannot listen: {0}", logging.ERROR),
    (re.compile(r"Not connected, trying to connect"), "Modbus peer not connected; reconnecting", logging.INFO),
    (re.compile(r"Cancel send, because not connected"), "Modbus peer went away before a reply", logging.INFO),
    (re.compile(r"No response received|Connection lost|Connection closed", re.I),
     "Modbus peer did not answer or closed the connection", logging.INFO),
)


class _MappedHandler(logging.Handler):
    """Re-logs pymodbus records on our logger: first line only, mapped, one per kind per interval."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(logging.DEBUG)
        self._interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}     # kind -> (last time shown, held back since)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().split("\n", 1)[0].strip()
        except Exception:                               # a malformed record must not break the caller
            return
        if not text or text == "Repeating....":
            return
        if record.levelno < logging.WARNING:
            log.debug("pymodbus: %s", text)
            return
        kind, shown, level = text, f"Modbus: {text}", logging.WARNING
        for pattern, template, mapped_level in _MAPPED:
            if match := pattern.search(text):
                shown, level = template.format(*match.groups()), mapped_level
                kind = shown
                break
        now = time.monotonic()
        with self._guard:
            last, held = self._last.get(kind, (float("-inf"), 0))
            if now - last < self._interval_s:
                self._last[kind] = (last, held + 1)
                return
            self._last[kind] = (now, 0)
        log.log(level, "%s%s", shown, f" ({held} more like it held back)" if held else "")


_installed: _MappedHandler | None = None
_install_guard = threading.Lock()


def quiet_pymodbus(interval_s: float = 30.0) -> None:
    """Route pymodbus's logger through :class:`_MappedHandler` (idempotent; the first interval wins)."""
    global _installed
    with _install_guard:
        if _installed is not None:
            return
        logger = logging.getLogger("pymodbus.logging")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        _installed = _MappedHandler(interval_s)
        logger.addHandler(_installed)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)       # below WARNING pymodbus formats hex dumps for nothing


class RepeatFilter(logging.Filter):
    """Lets each distinct message (its first line) through at most once per ``interval_s``; the next one that
    passes says how many were held back."""

    def __init__(self, interval_s: float) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}
        self._guard = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage().split("\n", 1)[0]
        except Exception:
            return True
        now = time.monotonic()
        with self._guard:
            last, held = self._last.get(text, (float("-inf"), 0))
            if now - last < self._interval_s:
                self._last[text] = (last, held + 1)
                return False
            self._last[text] = (now, 0)
            if len(self._last) > 1000:                   # distinct texts (ids in them): forget the oldest
                self._last.pop(next(iter(self._last)))
        if held:
            record.msg, record.args = f"{text} ({held} more like it held back)", ()
        return True


_asyncua_quieted = False


def quiet_asyncua(interval_s: float = 30.0) -> None:
    """Rate-limit asyncua's per-request server messages (idempotent)."""
    global _asyncua_quieted
    with _install_guard:
        if _asyncua_quieted:
            return
        for name in ("asyncua.server.uaprocessor", "asyncua.server.binary_server_asyncio",
                     "asyncua.server.internal_session"):
            logging.getLogger(name).addFilter(RepeatFilter(interval_s))
        _asyncua_quieted = True
