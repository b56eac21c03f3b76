"""Modbus reject links (``type: modbus-tcp`` / ``modbus-rtu``) with pymodbus; the map is register_map.py.

The runtime is the Modbus server (on RS-485: the slave) and the PLC the client (the master) that
polls it, which is how a PLC already talks to drives and remote I/O: no PLC-side server to set up,
and the PLC's own scan decides when it reads. The link's guarantees come from :class:`RejectLink`
unchanged: this transport turns each outgoing message into a register update and a PLC write of
ACK_SEQ / NAK_SEQ / HEARTBEAT_ECHO into the reply the link waits for.

Who may write (Modbus/TCP has no login): ``link.allow_clients`` lists the PLC's addresses, and any connection
from them may write (a PLC may read and write over separate connections). Without it, the first connection that
polls is the PLC's, and only it may write; its role moves only to a connection from the same address opened after
the old one went quiet (closed, or no request for ``silence_alarm_s``), so a client that was already connected
while the PLC polled can never take its place. A refused write gets exception 01 and raises the
``foreign_writer`` alarm; reads stay open (an HMI may watch). On RTU the bus has one master: every write is the
PLC's.
"""
from __future__ import annotations

import contextvars
import ipaddress
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from musc_edge.edge.links.base import MAX_ACK_TIMEOUT_S, LinkSettings
from musc_edge.edge.links.library_logs import quiet_pymodbus
from musc_edge.edge.links.register_map import REGISTER_COUNT, LineState, Reg, WriteRefused
from musc_edge.edge.links.register_transport import RegisterTransport

_START_TIMEOUT_S = 5.0


@dataclass(eq=False)
class ModbusClient:
    """One Modbus/TCP connection to the runtime's server."""

    host: str
    port: int
    opened: float                       # time.monotonic() at connect
    last_request: float
    closed: bool = False

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


# The connection whose request is being served (set per request by the server's handler, read by _on_access).
_CURRENT_CLIENT: contextvars.ContextVar[ModbusClient | None] = contextvars.ContextVar("modbus_client", default=None)


class _ModbusSettings(LinkSettings):
    # A PLC polls once per scan (typically 5..50 ms) and answers on the next: allow a few scans.
    ack_timeout_s: float = Field(0.25, gt=0, le=MAX_ACK_TIMEOUT_S, description=(
        "wait for the PLC's ACK_SEQ per publication"))


class ModbusTcpLinkConfig(_ModbusSettings):
    """``link: {type: modbus-tcp, host: 0.0.0.0, port: 502}``: the runtime serves, the PLC polls."""

    type: Literal["modbus-tcp"] = "modbus-tcp"
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(502, ge=1, le=65535, description="Modbus/TCP port to listen on")
    allow_clients: list[str] = Field(default_factory=list, description="IP addresses allowed to write (the "
                                     "PLC's); empty: the first client that polls")

    @field_validator("allow_clients")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        try:
            return [str(ipaddress.ip_address(address.strip())) for address in value]
        except ValueError as exc:
            raise ValueError(f"{exc} (list the PLC's IP addresses)") from None


class ModbusRtuLinkConfig(_ModbusSettings):
    """``link: {type: modbus-rtu, port: /dev/ttyTHS1, unit_id: 17}``: the runtime is slave ``unit_id``."""

    type: Literal["modbus-rtu"] = "modbus-rtu"
    port: str = Field(description="serial device of the RS-485 adapter, e.g. /dev/ttyUSB0")
    unit_id: int = Field(1, ge=1, le=247, description="this device's slave address on the bus")
    baudrate: int = Field(19200, gt=0, le=10_000_000)
    parity: Literal["N", "E", "O"] = Field("E", description="Modbus RTU default: even parity")
    stopbits: Literal[1, 2] = 1


class ModbusTransport(RegisterTransport):
    """A pymodbus server on its own event-loop thread, serving the register image to the PLC."""

    def __init__(self, config: ModbusTcpLinkConfig | ModbusRtuLinkConfig) -> None:
        super().__init__()
        self._config = config
        self._clients = 0
        self._plc: ModbusClient | None = None                # the connection that is the PLC's
        self._plc_host: str | None = None                     # default rule: the first poller's address
        if isinstance(config, ModbusTcpLinkConfig):
            self.description = f"modbus-tcp {config.host}:{config.port}"
        else:
            self.description = f"modbus-rtu {config.port} unit {config.unit_id}"

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        quiet_pymodbus()
        self._serve_on_own_loop(self._start, _START_TIMEOUT_S)
        self.image.update({Reg.LINE_STATE: LineState.STARTING})

    async def _start(self) -> None:
        from pymodbus.server import ModbusSerialServer, ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        config = self._config
        tcp = isinstance(config, ModbusTcpLinkConfig)
        device = SimDevice(id=0 if tcp else config.unit_id, action=self._on_access,   # TCP: any unit id
                           simdata=[SimData(0, count=REGISTER_COUNT, values=0, datatype=DataType.REGISTERS)])
        if tcp:
            server = _tcp_server_class(ModbusTcpServer)(device, address=(config.host, config.port),
                                                        trace_connect=self._on_connect)
            server.musc_transport = self
        else:
            server = ModbusSerialServer(device, port=config.port, baudrate=config.baudrate,
                                        parity=config.parity, stopbits=config.stopbits)
        await server.serve_forever(background=True)
        self._server = server

    def close(self) -> None:
        self._stop_serving(lambda server: server.shutdown(), _START_TIMEOUT_S)
        self._clients = 0

    @property
    def serving(self) -> bool:
        return self._server is not None

    def plc_connected(self) -> bool:
        return self._clients > 0 or not isinstance(self._config, ModbusTcpLinkConfig)

    # ------------------------------------------------------------------ server callbacks (event loop)

    async def _on_access(self, function_code: int, start_address: int, address: int, count: int,
                         registers: list[int], set_values: list[int] | list[bool] | None):
        from pymodbus.constants import ExcCodes

        client = _CURRENT_CLIENT.get()
        if set_values is not None:
            refusal = self._writer_refusal(client)
            if refusal is not None:
                self.refuse_writer(str(client), refusal)
                return ExcCodes.ILLEGAL_FUNCTION
            try:
                self.image.plc_write(address, [int(value) for value in set_values])
            except WriteRefused as exc:
                if exc.outside:
                    return ExcCodes.ILLEGAL_ADDRESS        # the runtime's registers are read-only to the PLC
                self.refuse_writer(str(client or "the PLC"), str(exc))
                return ExcCodes.ILLEGAL_VALUE
            return None
        if client is not None:
            self._note_poll(client)
        values = self.image.read(address, count)
        if values is None:
            return ExcCodes.ILLEGAL_ADDRESS
        registers[address - start_address:address - start_address + count] = values
        return None

    def _on_connect(self, connected: bool) -> None:
        self._clients = max(0, self._clients + (1 if connected else -1))

    # ------------------------------------------------------------------ who is the PLC (event loop)

    def _allowed_host(self, host: str) -> bool:
        allowed = self._config.allow_clients if isinstance(self._config, ModbusTcpLinkConfig) else []
        if allowed:
            return host in allowed
        return self._plc_host is None or host == self._plc_host

    def _may_become_plc(self, client: ModbusClient) -> bool:
        if not self._allowed_host(client.host):
            return False
        plc = self._plc
        if plc is None or plc is client:
            return True
        quiet = plc.closed or time.monotonic() - plc.last_request >= self._config.silence_alarm_s
        return quiet and client.opened > plc.last_request

    def _note_poll(self, client: ModbusClient) -> None:
        if client is not self._plc and self._may_become_plc(client):
            self._plc = client
            self._plc_host = self._plc_host or client.host
        client.last_request = time.monotonic()

    def _writer_refusal(self, client: ModbusClient | None) -> str | None:
        """Why ``client`` may not write (None: it is the PLC; RTU: always the PLC)."""
        if client is None:
            return None
        allowed = self._config.allow_clients if isinstance(self._config, ModbusTcpLinkConfig) else []
        if allowed and client.host in allowed:
            client.last_request = time.monotonic()
            return None
        if client is not self._plc:
            if not self._allowed_host(client.host):
                allowed = self._config.allow_clients or [self._plc_host]    # type: ignore[union-attr]
                return f"not an allowed client (link.allow_clients: {', '.join(map(str, allowed))})"
            if not self._may_become_plc(client):
                return f"the PLC is {self._plc} (another client may read, never write)"
            self._plc, self._plc_host = client, self._plc_host or client.host
        client.last_request = time.monotonic()
        return None

    def client_opened(self, peer: Any) -> ModbusClient:
        """A new connection from ``peer`` (asyncio's peername)."""
        host, port = (peer[0], peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else (str(peer), 0)
        now = time.monotonic()
        return ModbusClient(str(host), int(port), now, now)


def _tcp_server_class(base: type) -> type:
    """``base`` (pymodbus's ModbusTcpServer) whose connections know their peer: each request runs with
    :data:`_CURRENT_CLIENT` set, so the device callback can tell the PLC from another client."""
    from pymodbus.server.requesthandler import ServerRequestHandler

    class _Handler(ServerRequestHandler):
        client: ModbusClient | None = None

        def callback_connected(self) -> None:
            super().callback_connected()
            peer = self.transport.get_extra_info("peername") if self.transport else None
            self.client = self.server.musc_transport.client_opened(peer)

        def callback_disconnected(self, exc: Exception | None) -> None:
            if self.client is not None:
                self.client.closed = True
            super().callback_disconnected(exc)

        async def handle_request(self) -> None:
            _CURRENT_CLIENT.set(self.client)
            await super().handle_request()

    class _Server(base):  # type: ignore[misc, valid-type]
        musc_transport: ModbusTransport

        def callback_new_connection(self) -> _Handler:
            return _Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)

    return _Server
