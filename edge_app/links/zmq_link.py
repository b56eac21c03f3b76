"""ZeroMQ reject link: a DEALER socket talking to the PLC side's ROUTER, one body per message."""
from __future__ import annotations

import math
from typing import Literal

import zmq
from pydantic import Field

from musc_edge.edge.links.base import LinkIOError, LinkSettings, Transport
from musc_edge.edge.links.framing import FrameError, encode_body, stop_line_frame


class ZmqLinkConfig(LinkSettings):
    """``link: {type: zmq, endpoint: tcp://plc-gateway:5557, ...}``"""

    type: Literal["zmq"] = "zmq"
    endpoint: str = Field("tcp://127.0.0.1:5557", description="the PLC side's ROUTER endpoint")
    high_water_mark: int = Field(100, ge=1, le=1_000_000, description="messages queued per direction at most")


class ZmqTransport(Transport):
    """DEALER connected to the PLC's ROUTER.

    ``IMMEDIATE`` makes a send fail at once while no connection is up (counted as a failed try)
    instead of queueing it for later, ``LINGER=0`` drops unsent messages on close (the outbox and
    the ledger own them), and ZMTP heartbeats detect a dead peer on a half-open TCP connection.
    """

    def __init__(self, config: ZmqLinkConfig, context: zmq.Context | None = None) -> None:
        self._config = config
        self._context = context or zmq.Context.instance()
        self.description = f"zmq {config.endpoint}"
        self._socket: zmq.Socket | None = None

    def open(self) -> None:
        config = self._config
        sock = self._context.socket(zmq.DEALER)
        heartbeat_ms = max(1, round(config.heartbeat_interval_s * 1000))
        for option, value in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1),
                              (zmq.SNDHWM, config.high_water_mark), (zmq.RCVHWM, config.high_water_mark),
                              (zmq.RECONNECT_IVL, 100),
                              (zmq.RECONNECT_IVL_MAX, max(100, round(config.backoff_max_s * 1000))),
                              (zmq.HEARTBEAT_IVL, heartbeat_ms), (zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)):
            sock.setsockopt(option, value)
        try:
            sock.connect(config.endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise ValueError(f"zmq link endpoint {config.endpoint!r}: {exc}") from exc
        self._socket = sock

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close(linger=0)

    def write(self, body: bytes) -> bool:
        sock = self._require_socket()
        try:
            sock.send(body, zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise LinkIOError(f"send to {self._config.endpoint} failed: {exc}") from exc
        return True

    def send_stop_line(self, reason: str) -> bool:
        return self.write(encode_body(stop_line_frame(0, reason, epoch=self.line_epoch)))

    def read(self, timeout_s: float) -> list[bytes | FrameError]:
        sock = self._require_socket()
        bodies: list[bytes | FrameError] = []
        try:
            if not sock.poll(max(0, math.ceil(timeout_s * 1000)), zmq.POLLIN):
                return bodies
            while True:
                # A reply is one frame; a PLC gateway that adds REQ-style empty frames is tolerated.
                bodies.append(sock.recv_multipart(zmq.NOBLOCK)[-1])
        except zmq.Again:
            return bodies
        except zmq.ZMQError as exc:
            raise LinkIOError(f"receive from {self._config.endpoint} failed: {exc}") from exc

    def _require_socket(self) -> zmq.Socket:
        if self._socket is None:
            raise LinkIOError(f"{self._config.endpoint} is not open")
        return self._socket
