"""The ``telemetry`` block of a line config: everything off unless switched on."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import Field, SecretStr

from ..strict_model import StrictModel as _Strict


class PrometheusSettings(_Strict):
    enabled: bool = False
    host: str = Field("127.0.0.1", description="address of the /metrics endpoint (0.0.0.0: every interface)")
    port: int = Field(9108, ge=0, le=65535, description="0 picks a free port")


class MqttSettings(_Strict):
    enabled: bool = False
    host: str = Field("127.0.0.1", description="the plant's MQTT broker")
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = Field("musc-edge", min_length=1, description="events go to <prefix>/<line>/part|alarm")
    client_id: Optional[str] = Field(None, description="default: musc-edge-<line>")
    username: Optional[str] = None
    password: Optional[SecretStr] = None
    tls: bool = Field(False, description="TLS with the system's CA certificates")
    qos: int = Field(1, ge=1, le=2, description="1 (at least once) or 2 (exactly once)")
    keepalive_s: int = Field(30, ge=5, le=65_535, description="MQTT's own limit")
    outbox: Optional[Path] = Field(None, description="durable outbox (SQLite); default <storage.dir>/"
                                   "telemetry-outbox.sqlite")
    outbox_max_events: int = Field(1_000_000, ge=1000, le=100_000_000, description="oldest events dropped beyond this (alarmed)")


class TelemetrySettings(_Strict):
    prometheus: PrometheusSettings = PrometheusSettings()
    mqtt: MqttSettings = MqttSettings()
