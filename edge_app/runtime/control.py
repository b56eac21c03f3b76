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
import socket
import threading
from pathlib import Path
from typing import Callable

from ..limits import loads_bounded
from .commands import READ_ONLY

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
MAX_CONNECTIONS = 16        # requests answered at once; more connections are told "busy" and closed
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
    """Serves requests on ``path`` with ``handler(request) -> reply`` in a background thread."""

    def __init__(self, path: str | Path, token: str, handler: Callable[[dict], dict]):
        self.path = Path(path)
        self._token, self._handler = token, handler
        if self.path.exists():
            self.path.unlink()  # a stale socket from a killed runtime
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o660)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):   # a flood of connections: answered "busy", at once
                self._refuse(conn)
                continue
            threading.Thread(target=self._answer, args=(conn,), name="control-request", daemon=True).start()

    @staticmethod
    def _refuse(conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(0.2)
                conn.sendall(json.dumps({"ok": False, "error": f"the line is answering {MAX_CONNECTIONS} requests "
                                                               "already; try again", "busy": True}).encode() + b"\n")
            except OSError:
                pass

    def _answer(self, conn: socket.socket) -> None:
        try:
            self._answer_one(conn)
        finally:
            self._slots.release()

    def _answer_one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                reply = self.dispatch(loads_bounded(data or b"null", where="request", max_bytes=MAX_REQUEST))
            except (ValueError, UnicodeDecodeError) as exc:
                reply = {"ok": False, "error": f"malformed request: {exc}"}
            except OSError:   # a client that connected and sent nothing within the timeout
                return
            try:
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
            except OSError:
                log.debug("control client went away before the reply")

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
        self._sock.close()
        self._thread.join(timeout=2)
        self.path.unlink(missing_ok=True)


def request(path: str | Path, payload: dict, timeout: float = 60.0) -> dict:
    """Send one request to a running line and return its reply (ControlError if the line is not running)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError(f"no running line answers on {path} ({exc.strerror}): is the runtime started?") from None
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
