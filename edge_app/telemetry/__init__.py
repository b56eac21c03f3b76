"""Telemetry for the plant, off by default: a Prometheus endpoint and MQTT events with a durable outbox."""
from edge_app.telemetry.config import MqttSettings, PrometheusSettings, TelemetrySettings
from edge_app.telemetry.hub import Telemetry

__all__ = ["MqttSettings", "PrometheusSettings", "Telemetry", "TelemetrySettings"]
