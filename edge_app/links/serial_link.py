"""Serial reject link: COBS-framed messages over any pyserial URL (/dev/ttyTHS1, socket://, loop://)."""
from __future__ import annotations

import time
from typing import Literal

import serial
from pydantic import Field

from musc_edge.edge.links.base import LinkIOError, LinkSettings, Transport
from musc_edge.edge.links.framing import FrameError, StreamDeframer, encode_body, stop_line_frame, stream_frame

_POLL_S = 0.01      # longest single blocking read, so close() and deadlines are honoured promptly


class SerialLinkConfig(LinkSettings):
    """``link: {type: serial, url: /dev/ttyTHS1, baudrate: 115200, ...}``"""

    type: Literal["serial"] = "serial"
    url: str = Field(description="pyserial URL or device path: /dev/ttyTHS1, socket://host:port, ...")
    baudrate: int = Field(115200, gt=0, le=10_000_000)
    write_timeout_s: float = Field(0.05, gt=0, le=60, description="a write blocked longer counts as a failed try")


class SerialTransport(Transport):
    """A pyserial port opened with ``serial.serial_for_url``; bodies travel as 0x00|COBS|0x00."""

    def __init__(self, config: SerialLinkConfig) -> None:
        self._config = config
        self.description = f"serial {config.url}"
        self._port: serial.SerialBase | None = None
        self._deframer = StreamDeframer()

    def open(self) -> None:
        config = self._config
        try:
            port = serial.serial_for_url(config.url, baudrate=config.baudrate,
                                         timeout=min(_POLL_S, config.ack_timeout_s),
                                         write_timeout=config.write_timeout_s)
        except ValueError as exc:
            raise ValueError(f"serial link url {config.url!r}: {exc}") from exc
        except (serial.SerialException, OSError) as exc:
            raise LinkIOError(f"cannot open {config.url}: {exc}") from exc
        try:
            port.reset_input_buffer()            # drop bytes left over from before this connection
        except (serial.SerialException, OSError) as exc:
            port.close()
            raise LinkIOError(f"cannot open {config.url}: {exc}") from exc
        self._port, self._deframer = port, StreamDeframer()

    def close(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError):
                pass                             # the device is already gone

    def write(self, body: bytes) -> bool:
        port = self._require_port()
        try:
            port.write(stream_frame(body))
        except serial.SerialTimeoutException:
            return False
        except (serial.SerialException, OSError) as exc:
            raise LinkIOError(f"write to {self._config.url} failed: {exc}") from exc
        return True

    def send_stop_line(self, reason: str) -> bool:
        return self.write(encode_body(stop_line_frame(0, reason, epoch=self.line_epoch)))

    def read(self, timeout_s: float) -> list[bytes | FrameError]:
        port = self._require_port()
        until = time.monotonic() + timeout_s
        try:
            while True:
                data = port.read(max(1, port.in_waiting))
                if data:
                    bodies = self._deframer.feed(data)
                    if bodies:
                        return bodies
                if time.monotonic() >= until:
                    return []
        except (serial.SerialException, OSError) as exc:
            raise LinkIOError(f"read from {self._config.url} failed: {exc}") from exc

    def _require_port(self) -> serial.SerialBase:
        if self._port is None:
            raise LinkIOError(f"{self._config.url} is not open")
        return self._port
