"""Reject links: verdicts to the PLC over serial, ZeroMQ, Modbus or OPC UA, picked by the config's ``type``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping, Union

from pydantic import Field, TypeAdapter, ValidationError

from musc_edge.edge.links.base import (
    AckCallback,
    AlarmCallback,
    LinkClosedError,
    LinkHealth,
    LinkIOError,
    LinkSettings,
    RejectLink,
    SendResult,
    Transport,
    new_line_epoch,
)
from musc_edge.edge.links.modbus_link import ModbusRtuLinkConfig, ModbusTcpLinkConfig, ModbusTransport
from musc_edge.edge.links.opcua_link import OpcUaLinkConfig, OpcUaTransport
from musc_edge.edge.links.plant_link import PlantLink
from musc_edge.edge.links.serial_link import SerialLinkConfig, SerialTransport
from musc_edge.edge.links.zmq_link import ZmqLinkConfig, ZmqTransport

AnyLinkConfig = Union[SerialLinkConfig, ZmqLinkConfig, ModbusTcpLinkConfig, ModbusRtuLinkConfig, OpcUaLinkConfig]
LinkConfig = Annotated[AnyLinkConfig, Field(discriminator="type")]
_TRANSPORTS: dict[type, type[Transport]] = {
    SerialLinkConfig: SerialTransport, ZmqLinkConfig: ZmqTransport, ModbusTcpLinkConfig: ModbusTransport,
    ModbusRtuLinkConfig: ModbusTransport, OpcUaLinkConfig: OpcUaTransport,
}
_LINK_CONFIG = TypeAdapter(LinkConfig)

__all__ = [
    "LinkClosedError", "LinkConfig", "LinkHealth", "LinkIOError", "LinkSettings", "RejectLink",
    "ModbusRtuLinkConfig", "ModbusTcpLinkConfig", "OpcUaLinkConfig", "PlantLink",
    "SendResult", "SerialLinkConfig", "SerialTransport", "Transport", "ZmqLinkConfig", "ZmqTransport",
    "new_line_epoch", "open_link", "parse_link_config",
]


def parse_link_config(raw: Mapping[str, Any]) -> AnyLinkConfig:
    """Validate a ``link`` config section; ValueError names the offending key and value."""
    try:
        return _LINK_CONFIG.validate_python(dict(raw))
    except ValidationError as exc:
        raise ValueError("invalid link config: " + "; ".join(map(_describe, exc.errors()))) from None


def _describe(error: Any) -> str:
    loc = [str(part) for part in error["loc"]]
    if loc and loc[0] in ("serial", "zmq", "modbus-tcp", "modbus-rtu", "opcua"):   # the union member's tag
        loc = loc[1:]
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc = ["type"]
    if not loc:
        return f"link: {error['msg']}"
    if error["type"] in ("missing", "union_tag_not_found"):
        return f"link.{'.'.join(loc)}: {error['msg']}"
    shown = error["ctx"]["tag"] if error["type"] == "union_tag_invalid" else error.get("input")
    return f"link.{'.'.join(loc)}: {error['msg']} (got {shown!r})"


def open_link(config: AnyLinkConfig | Mapping[str, Any], *,
              on_ack: AckCallback | None = None, on_alarm: AlarmCallback | None = None,
              on_alarm_cleared: AlarmCallback | None = None, epoch: int | None = None,
              storage_dir: str | Path | None = None) -> RejectLink:
    """A running RejectLink for ``config`` (a validated model or a raw mapping with ``type``).

    ``epoch``: the line epoch (the ledger's; None: a random one). ``storage_dir``: where a transport keeps
    what it generates (the OPC UA server's certificate; None: a new one in memory each start).
    """
    if not isinstance(config, tuple(_TRANSPORTS)):
        config = parse_link_config(config)
    if isinstance(config, OpcUaLinkConfig):
        transport: Transport = OpcUaTransport(config, storage_dir=storage_dir)
    else:
        transport = _TRANSPORTS[type(config)](config)
    link_class = PlantLink if isinstance(transport, (ModbusTransport, OpcUaTransport)) else RejectLink
    return link_class(transport, config, on_ack=on_ack, on_alarm=on_alarm, on_alarm_cleared=on_alarm_cleared,
                      epoch=epoch)
