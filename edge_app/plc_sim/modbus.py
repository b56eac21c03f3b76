"""PLC simulator for the Modbus links: a pymodbus client (RTU: master) scanning the runtime's registers.

Each scan is what docs/wire-protocol.md asks of a PLC programmer: an FC3 read of the verdict registers,
an FC16 write of EPOCH_ACK when EPOCH is not acknowledged, an FC6 write of HEARTBEAT_ECHO when HEARTBEAT
changed, and for a NEW verdict one FC16 write of ACK_SEQ (or of NAK_SEQ + NAK_CODE to refuse it). :class:`PtyPair` joins two pseudo-terminals like a
null-modem cable, so RTU runs hardware-free.
"""
from __future__ import annotations

import os
import select
import threading
import tty
from typing import Any

from musc_edge.edge.links.framing import NakCode
from musc_edge.edge.links.library_logs import quiet_pymodbus
from musc_edge.edge.links.register_map import Reg, decode_verdict, join32, split32
from musc_edge.edge.plc_sim.polling import PlcView, PollingPlcSimulator


class ModbusPlcSimulator(PollingPlcSimulator):
    """A Modbus client polling the runtime's server: ``tcp://host:port`` or an RTU serial port."""

    def __init__(self, client: Any, address: str, unit_id: int = 1, **options: Any) -> None:
        options.setdefault("scan_s", 0.01)          # a PLC polling every 10 ms
        quiet_pymodbus()
        super().__init__(**options)
        self._client, self.address, self.unit_id = client, address, unit_id

    @classmethod
    def on_tcp(cls, host: str, port: int, source_address: str | None = None, **options: Any) -> ModbusPlcSimulator:
        """A Modbus/TCP client of ``host:port``; ``source_address``: the local address to connect from."""
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient(host, port=port, timeout=0.5, retries=0,
                                 source_address=None if source_address is None else (source_address, 0))
        return cls(client, f"{host}:{port}", **options)

    @classmethod
    def on_rtu(cls, port: str, unit_id: int = 1, baudrate: int = 19200, parity: str = "E",
               **options: Any) -> ModbusPlcSimulator:
        from pymodbus.client import ModbusSerialClient
        from pymodbus.framer import FramerType

        client = ModbusSerialClient(port, framer=FramerType.RTU, baudrate=baudrate, parity=parity,
                                    timeout=0.5, retries=0)
        return cls(client, port, unit_id=unit_id, **options)

    def _connect(self) -> None:
        if not self._client.connect():
            raise ConnectionError(f"cannot connect to the runtime's Modbus server at {self.address}")

    def _disconnect(self) -> None:
        self._client.close()

    def _read(self) -> PlcView:
        """Registers 0..28 every scan; the part id (32..63) only while a verdict is new, as a PLC on a
        19200-baud RS-485 bus would (each register read costs about 1 ms of wire time there)."""
        head = self._read_registers(0, Reg.EPOCH_ACK_LO + 1)
        text = self._read_registers(Reg.PART_TEXT, 32) if head[Reg.NEW_VERDICT] else [0] * 32
        registers = head + [0] * (Reg.PART_TEXT - len(head)) + text
        verdict = decode_verdict(registers)
        nak_pending = registers[Reg.NAK_CODE] != 0 and \
            (registers[Reg.NAK_SEQ_HI], registers[Reg.NAK_SEQ_LO]) == tuple(split32(verdict.seq))
        return PlcView(heartbeat=registers[Reg.HEARTBEAT], new_verdict=bool(registers[Reg.NEW_VERDICT]),
                       verdict=verdict, stop_count=registers[Reg.STOP_COUNT], nak_pending=nak_pending,
                       epoch=verdict.epoch, epoch_acked=join32(registers[Reg.EPOCH_ACK_HI], registers[Reg.EPOCH_ACK_LO]),
                       heartbeat_count=registers[Reg.HEARTBEAT_COUNT])

    def _read_registers(self, address: int, count: int) -> list[int]:
        response = self._client.read_holding_registers(address, count=count, device_id=self.unit_id)
        return list(self._checked(response).registers)

    def _write_ack(self, seq: int) -> None:
        self._checked(self._client.write_registers(Reg.ACK_SEQ_HI, split32(seq), device_id=self.unit_id))

    def _write_nak(self, seq: int, code: NakCode) -> None:
        self._checked(self._client.write_registers(Reg.NAK_SEQ_HI, [*split32(seq), int(code)],
                                                   device_id=self.unit_id))

    def _write_epoch_ack(self, epoch: int) -> None:
        self._checked(self._client.write_registers(Reg.EPOCH_ACK_HI, split32(epoch), device_id=self.unit_id))

    def _write_heartbeat_echo(self, counter: int) -> None:
        self._checked(self._client.write_register(Reg.HEARTBEAT_ECHO, counter, device_id=self.unit_id))

    def _write_stop_ack(self, count: int) -> None:
        self._checked(self._client.write_register(Reg.STOP_ACK, count, device_id=self.unit_id))

    @staticmethod
    def _checked(response: Any) -> Any:
        from pymodbus.exceptions import ModbusException

        if isinstance(response, ModbusException) or response.isError():
            raise ConnectionError(f"Modbus request failed: {response}")
        return response

    def _scan(self) -> None:
        from pymodbus.exceptions import ModbusException

        try:
            super()._scan()
        except ModbusException as exc:              # no answer, broken connection, bad CRC
            raise ConnectionError(str(exc)) from exc


class PtyPair:
    """Two pseudo-terminals joined back to back (like ``socat pty pty``): open ``a`` and ``b``."""

    def __init__(self) -> None:
        self._ends = [os.openpty(), os.openpty()]
        for _, slave in self._ends:
            tty.setraw(slave)
        self.a, self.b = (os.ttyname(slave) for _, slave in self._ends)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._pump, name="pty-pair", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        (master_a, _), (master_b, _) = self._ends
        peer = {master_a: master_b, master_b: master_a}
        while True:
            ready, _, _ = select.select([master_a, master_b, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            for fd in ready:
                try:
                    os.write(peer[fd], os.read(fd, 4096))
                except OSError:
                    pass                             # no reader on the other end yet

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(2.0)
        for master, slave in self._ends:
            os.close(master)
            os.close(slave)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def __enter__(self) -> PtyPair:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
