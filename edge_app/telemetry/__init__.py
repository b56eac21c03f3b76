"""Telemetry for the plant, off by default: a Prometheus endpoint and MQTT events with a durable outbox."""
from musc_edge.edge.telemetry.config import MqttSettings, PrometheusSettings, TelemetrySettings
from musc_edge.edge.telemetry.hub import Telemetry

__all__ = ["MqttSettings", "PrometheusSettings", "Telemetry", "TelemetrySettings"]
