"""One object the line calls per part, ack and alarm; it fans out to the configured exporters."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from musc_edge.edge.record import PartRecord
from musc_edge.edge.telemetry.config import TelemetrySettings
from musc_edge.edge.telemetry.events import alarm_event, part_event

log = logging.getLogger(__name__)


class Telemetry:
    """Prometheus and/or MQTT, as configured; every call is cheap, never raises, and is a no-op when off."""

    def __init__(self, settings: TelemetrySettings, line: str, storage: str | Path,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.line = line
        self.prometheus = self.mqtt = None
        if settings.prometheus.enabled:
            from musc_edge.edge.telemetry.prometheus import PrometheusExporter

            try:
                self.prometheus = PrometheusExporter(settings.prometheus, line, status)
            except OSError as exc:      # e.g. the port is taken: inspecting matters more than the metrics
                log.error("telemetry: no Prometheus endpoint on %s:%s: %s", settings.prometheus.host,
                          settings.prometheus.port, exc)
        if settings.mqtt.enabled:
            from musc_edge.edge.telemetry.mqtt import MqttPublisher

            outbox = settings.mqtt.outbox or Path(storage) / "telemetry-outbox.sqlite"
            try:
                self.mqtt = MqttPublisher(settings.mqtt, line, outbox)
            except Exception as exc:   # e.g. an outbox that cannot be opened: the line inspects without MQTT
                log.error("telemetry: no MQTT publisher for %s:%s: %s", settings.mqtt.host, settings.mqtt.port, exc)

    @property
    def enabled(self) -> bool:
        return self.prometheus is not None or self.mqtt is not None

    def bind_status(self, status: Callable[[], dict[str, Any]]) -> None:
        if self.prometheus is not None:
            self.prometheus.bind_status(status)

    def part(self, part: PartRecord, calibration_version: str) -> None:
        """A part was decided and signalled (its ledger row exists)."""
        try:
            if self.prometheus is not None:
                self.prometheus.part(part, calibration_version)
            if self.mqtt is not None:
                self.mqtt.publish("part", part_event(part, self.line, calibration_version))
        except Exception:
            log.exception("telemetry: part %s not exported", part.part_id)

    def ack(self, seq: int, late: bool) -> None:
        try:
            if self.prometheus is not None:
                self.prometheus.ack(late)
        except Exception:
            log.exception("telemetry: ack %s not exported", seq)

    def alarm(self, text: str) -> None:
        try:
            if self.prometheus is not None:
                self.prometheus.alarm(text)
            if self.mqtt is not None:
                self.mqtt.publish("alarm", alarm_event(text, self.line))
        except Exception:
            log.exception("telemetry: alarm not exported")

    def close(self) -> None:
        for exporter in (self.mqtt, self.prometheus):
            if exporter is not None:
                try:
                    exporter.close()
                except Exception:
                    log.exception("telemetry: closing %r failed", exporter)
