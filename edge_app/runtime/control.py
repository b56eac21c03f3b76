"""Local control socket of a running line (AF_UNIX, JSON lines; no network port).

One request per connection: a JSON object with ``cmd``; one JSON reply with ``ok``. Read-only commands
(``status``, ``pool_inspect``, ``pool_scores``) are open to anyone who can reach the socket, answered on
the connection's own thread (never the scoring thread), at most :data:`MAX_CONNECTIONS` at once; commands
that change the line need ``token``: the content of ``<storage>/calibration/technician.token`` (mode 0640: give the
technician group read access to grant the role). Changes run on the worker thread *between two parts*
and the reply comes once they are in force. A token shorter than :data:`MIN_TOKEN_CHARS` (an empty file
left by a full disk, a hand-written "1234") refuses every change: no token is never the same as any token.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from ..limits import loads_bounded
from .commands import READ_ONLY

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
MAX_CONNECTIONS = 16        # requests answered at once; more are told "busy" at once
MAX_PENDING = 256           # connections waiting to send their request; beyond that the oldest is closed
REQUEST_TIMEOUT_S = 10.0    # a client has this long to send its request line
MIN_TOKEN_CHARS = 16


class ControlError(RuntimeError):
    """A control request failed; the message says why (and nothing was changed)."""


class ReplyLost(ControlError):
    """The request was sent but no reply came (the line stopped or timed out): whether it took effect is not
    known; the audit log records the outcome as unknown."""

    outcome_unknown = True


def token_path(storage_dir: str | Path) -> Path:
    return Path(storage_dir) / "calibration" / "technician.token"


def ensure_token(storage_dir: str | Path) -> str:
    """The technician token, created (random, mode 0640) if the line has none yet or only an unusable one
    (shorter than MIN_TOKEN_CHARS). Written atomically: a full disk raises OSError and leaves no empty file."""
    from .calibration_state import atomic_write

    path = token_path(storage_dir)
    if path.is_file():
        token = path.read_text().strip()
        if len(token) >= MIN_TOKEN_CHARS:
            return token
        log.warning("technician token %s is unusable (%d characters); writing a new one", path, len(token))
    token = secrets.token_hex(16)
    atomic_write(path, (token + "\n").encode(), mode=0o640)
    return token


class ControlServer:
    """Serves requests on ``path`` with ``handler(request) -> reply``.

    One thread reads every connection's request line (a selector: an idle connection costs a file
    descriptor, not a thread; at most :data:`MAX_PENDING` are kept, the oldest closed beyond that, and each
    gets :data:`REQUEST_TIMEOUT_S` to send its line); a complete request is answered on a thread of its own,
    at most :data:`MAX_CONNECTIONS` at once (more are answered "busy" at once)."""

    def __init__(self, path: str | Path, token: str, handler: Callable[[dict], dict]):
        self.path = Path(path)
        self._token, self._handler = token, handler
        if self.path.exists():
            self.path.unlink()  # a stale socket from a killed runtime
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o660)
        self._sock.listen(64)
        self._sock.setblocking(False)
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        pending: dict[socket.socket, tuple[bytearray, float]] = {}   # connection -> (bytes so far, deadline)
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                try:
                    events = selector.select(timeout=0.2)
                except OSError:
                    return
                for key, _ in events:
                    if key.fileobj is self._sock:
                        self._accept(selector, pending)
                    else:
                        self._read(selector, pending, key.fileobj)
                now = time.monotonic()
                for conn in [c for c, (_, deadline) in pending.items() if deadline < now]:
                    self._drop(selector, pending, conn)   # connected and sent nothing in time
            for conn in list(pending):
                self._drop(selector, pending, conn)

    def _accept(self, selector: selectors.BaseSelector, pending: dict) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._stop.set()
            return
        conn.setblocking(False)
        if len(pending) >= MAX_PENDING:   # a flood of idle connections: the oldest goes
            self._drop(selector, pending, next(iter(pending)))
        pending[conn] = (bytearray(), time.monotonic() + REQUEST_TIMEOUT_S)
        selector.register(conn, selectors.EVENT_READ)

    def _read(self, selector: selectors.BaseSelector, pending: dict, conn: socket.socket) -> None:
        data = pending[conn][0]
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        data += chunk
        if chunk and not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            return
        selector.unregister(conn)
        del pending[conn]
        if not data:
            conn.close()
            return
        conn.setblocking(True)
        if not self._slots.acquire(blocking=False):
            self._send(conn, {"ok": False, "busy": True,
                              "error": f"the line is answering {MAX_CONNECTIONS} requests already; try again"})
            return
        threading.Thread(target=self._answer, args=(conn, bytes(data)), name="control-request", daemon=True).start()

    @staticmethod
    def _drop(selector: selectors.BaseSelector, pending: dict, conn: socket.socket) -> None:
        selector.unregister(conn)
        del pending[conn]
        conn.close()

    @staticmethod
    def _send(conn: socket.socket, reply: dict) -> None:
        with conn:
            try:
                conn.settimeout(REQUEST_TIMEOUT_S)
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
            except OSError:
                log.debug("control client went away before the reply")

    def _answer(self, conn: socket.socket, data: bytes) -> None:
        try:
            try:
                reply = self.dispatch(loads_bounded(data, where="request", max_bytes=MAX_REQUEST))
            except (ValueError, UnicodeDecodeError) as exc:
                reply = {"ok": False, "error": f"malformed request: {exc}"}
            self._send(conn, reply)
        finally:
            self._slots.release()

    def dispatch(self, request) -> dict:
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": "a request is a JSON object with a string 'cmd'"}
        if request["cmd"] not in READ_ONLY and (len(self._token) < MIN_TOKEN_CHARS or not hmac.compare_digest(
                str(request.get("token", "")).encode(), self._token.encode())):
            return {"ok": False, "error": f"'{request['cmd']}' changes the line and needs the technician role "
                                          f"(the token file is not readable for this user)", "denied": True}
        try:
            return {"ok": True, **self._handler(request)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # never let a bad request take the line down
            log.exception("control request %s failed", request.get("cmd"))
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)   # the selector wakes every 0.2 s and closes what is pending
        self._sock.close()
        self.path.unlink(missing_ok=True)


def _connect(sock: socket.socket, path: str | Path, deadline: float) -> None:
    """Connect to the control socket, waiting while its accept queue is full (a burst of other clients: a socket
    with a timeout gets EAGAIN there instead of blocking) until ``deadline``."""
    while True:
        try:
            sock.connect(str(path))
            return
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(f"no running line answers on {path} ({exc.strerror}): is the runtime started?") from None
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ReplyLost(f"the line on {path} accepted no connection in time (its control socket is "
                                "flooded with connections)") from None
            time.sleep(0.05)


def request(path: str | Path, payload: dict, timeout: float = 60.0) -> dict:
    """Send one request to a running line and return its reply (ControlError if the line is not running)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, path, time.monotonic() + timeout)
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise ReplyLost(f"the line on {path} did not reply within {timeout:g} s") from None
    if not data:
        raise ReplyLost(f"the line on {path} closed the connection without a reply")
    return json.loads(data)
