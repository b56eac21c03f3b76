"""A Prometheus /metrics endpoint (prometheus-client) for one line: counters per part, histograms per
stage, and gauges read from the line's status at scrape time (pools, link, calibration)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from musc_edge.edge.record import PartRecord
from musc_edge.edge.telemetry.config import PrometheusSettings
from musc_edge.edge.telemetry.events import STAGES

# Per-stage latency buckets, seconds: a part takes ~0.1 s, a deadline is a few hundred ms.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class PrometheusExporter:
    """Serves ``http://<host>:<port>/metrics``; ``status`` (Line.control_status) feeds the gauges."""

    def __init__(self, settings: PrometheusSettings, line: str,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

        self.registry = registry = CollectorRegistry()
        labels = {"line": line}
        self._line = line
        self.parts = Counter("musc_parts", "Parts decided, by verdict", ["line", "verdict"], registry=registry)
        self.reasons = Counter("musc_verdict_reasons", "Parts by verdict reason", ["line", "reason"],
                               registry=registry)
        self.acks = Counter("musc_acks", "Verdicts the PLC acknowledged", ["line", "late"], registry=registry)
        self.alarms = Counter("musc_alarms", "Alarms raised", ["line"], registry=registry)
        self.stages = Histogram("musc_stage_seconds", "Time per part and stage", ["line", "stage"],
                                buckets=_BUCKETS, registry=registry)
        for verdict in ("ACCEPT", "REJECT", "NO_VERDICT"):
            self.parts.labels(line, verdict)
        for late in ("false", "true"):
            self.acks.labels(line, late)
        self.alarms.labels(**labels)
        self._status = status
        registry.register(_StatusCollector(self))
        self._server, self._thread = start_http_server(settings.port, addr=settings.host, registry=registry)
        self.port = self._server.server_port

    def bind_status(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def part(self, part: PartRecord, calibration_version: str) -> None:
        verdict = part.verdict.value if part.verdict is not None else "NO_VERDICT"
        self.parts.labels(self._line, verdict).inc()
        self.reasons.labels(self._line, part.reason.label if part.reason is not None else "unknown").inc()
        for stage in STAGES:
            value = getattr(part.times, stage, 0.0)
            if value:
                self.stages.labels(self._line, stage).observe(value)

    def ack(self, late: bool) -> None:
        self.acks.labels(self._line, "true" if late else "false").inc()

    def alarm(self, text: str) -> None:
        self.alarms.labels(self._line).inc()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _StatusCollector:
    """Gauges computed from the line's status when Prometheus scrapes."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        status_of = self._exporter._status
        if status_of is None:
            return
        try:
            status = status_of()
        except Exception:                                    # a scrape never takes the line down
            return
        line = self._exporter._line
        size = GaugeMetricFamily("musc_pool_size", "Parts in the recipe's reference pool", labels=["line", "recipe"])
        capacity = GaugeMetricFamily("musc_pool_capacity", "Pool capacity", labels=["line", "recipe"])
        oldest = GaugeMetricFamily("musc_pool_oldest_age_seconds", "Age of the pool's oldest part",
                                   labels=["line", "recipe"])
        newest = GaugeMetricFamily("musc_pool_newest_age_seconds", "Age of the pool's newest part",
                                   labels=["line", "recipe"])
        for recipe, info in (status.get("recipes") or {}).items():
            pool = info.get("pool") or {}
            size.add_metric([line, recipe], pool.get("size") or 0)
            capacity.add_metric([line, recipe], pool.get("capacity") or 0)
            if pool.get("oldest_age_s") is not None:
                oldest.add_metric([line, recipe], pool["oldest_age_s"])
                newest.add_metric([line, recipe], pool["newest_age_s"])
        yield from (size, capacity, oldest, newest)
        calibration = GaugeMetricFamily("musc_calibration_version", "Calibration version in force", labels=["line"])
        try:
            calibration.add_metric([line], float(status.get("calibration_version") or 0))
        except ValueError:
            calibration.add_metric([line], -1)
        yield calibration
        queue_depth = GaugeMetricFamily("musc_queue_depth", "Parts waiting for inspection", labels=["line"])
        queue_depth.add_metric([line], status.get("queue_depth") or 0)
        yield queue_depth
        link = status.get("link")
        if link:
            up = GaugeMetricFamily("musc_link_up", "1 when the PLC answers", labels=["line"])
            up.add_metric([line], 1.0 if link.get("connected") else 0.0)
            outbox = GaugeMetricFamily("musc_link_outbox", "Verdicts waiting for the PLC's ack", labels=["line"])
            outbox.add_metric([line], link.get("outbox_depth") or 0)
            active = GaugeMetricFamily("musc_alarms_active", "Alarms active on the link", labels=["line"])
            active.add_metric([line], len(link.get("alarms") or ()))
            yield from (up, outbox, active)
