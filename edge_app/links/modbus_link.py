"""Modbus reject links (``type: modbus-tcp`` / ``modbus-rtu``) with pymodbus; the map is register_map.py.

The runtime is the Modbus server (on RS-485: the slave) and the PLC the client (the master) that
polls it, which is how a PLC already talks to drives and remote I/O: no PLC-side server to set up,
and the PLC's own scan decides when it reads. The link's guarantees come from :class:`RejectLink`
unchanged: this transport turns each outgoing message into a register update and a PLC write of
ACK_SEQ / NAK_SEQ / HEARTBEAT_ECHO into the reply the link waits for.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from musc_edge.edge.links.base import MAX_ACK_TIMEOUT_S, LinkSettings
from musc_edge.edge.links.register_map import REGISTER_COUNT, LineState, Reg
from musc_edge.edge.links.register_transport import RegisterTransport

_START_TIMEOUT_S = 5.0


class _ModbusSettings(LinkSettings):
    # A PLC polls once per scan (typically 5..50 ms) and answers on the next: allow a few scans.
    ack_timeout_s: float = Field(0.25, gt=0, le=MAX_ACK_TIMEOUT_S, description=(
        "wait for the PLC's ACK_SEQ per publication"))


class ModbusTcpLinkConfig(_ModbusSettings):
    """``link: {type: modbus-tcp, host: 0.0.0.0, port: 502}``: the runtime serves, the PLC polls."""

    type: Literal["modbus-tcp"] = "modbus-tcp"
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(502, ge=1, le=65535, description="Modbus/TCP port to listen on")


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
        if isinstance(config, ModbusTcpLinkConfig):
            self.description = f"modbus-tcp {config.host}:{config.port}"
        else:
            self.description = f"modbus-rtu {config.port} unit {config.unit_id}"

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
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
            server = ModbusTcpServer(device, address=(config.host, config.port), trace_connect=self._on_connect)
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

        if set_values is not None:
            if not self.image.plc_write(address, [int(value) for value in set_values]):
                return ExcCodes.ILLEGAL_ADDRESS        # the runtime's registers are read-only to the PLC
            return None
        values = self.image.read(address, count)
        if values is None:
            return ExcCodes.ILLEGAL_ADDRESS
        registers[address - start_address:address - start_address + count] = values
        return None

    def _on_connect(self, connected: bool) -> None:
        self._clients = max(0, self._clients + (1 if connected else -1))
