"""Telemetry against the real things on loopback: a mosquitto broker started by the test (stopped and
restarted for an outage), a Prometheus scrape over HTTP, and a whole line over a Modbus TCP link."""
from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from musc_edge.edge.config import parse_config
from musc_edge.edge.record import PartRecord, Reason, StageTimes, Verdict
from musc_edge.edge.telemetry import MqttSettings, PrometheusSettings, Telemetry, TelemetrySettings
from musc_edge.edge.telemetry.local_broker import CollectingSubscriber, LocalBroker, free_port, mosquitto_binary
from musc_edge.edge.telemetry.mqtt import MqttPublisher

MOSQUITTO = mosquitto_binary()
needs_broker = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto not installed (apt-get install -y mosquitto; "
                                                            ".ci/run installs it)")
Broker, Subscriber = LocalBroker, CollectingSubscriber


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto; .ci/run installs it)")
    running = LocalBroker(tmp_path / "broker").start()
    yield running
    running.stop()


def part(n: int, verdict: Verdict = Verdict.ACCEPT, reason: Reason = Reason.OK) -> PartRecord:
    record = PartRecord(part_id=f"P-{n}", recipe="default", capture_time=time.time())
    record.decide(verdict, reason)
    record.signalled, record.seq, record.score, record.threshold, record.acked = verdict, n, 0.5, 1.0, True
    record.times = StageTimes(decode=0.002, features=0.05, scoring=0.01, link=0.003, total=0.07)
    return record


def mqtt_settings(broker: Broker, **extra: Any) -> MqttSettings:
    return MqttSettings(enabled=True, host="127.0.0.1", port=broker.port, **extra)


# --------------------------------------------------------------------------------- MQTT

@needs_broker
def test_a_broker_outage_loses_nothing_and_events_arrive_in_order_once(broker: Broker, tmp_path: Path) -> None:
    subscriber = Subscriber(broker.port, "musc-edge/line-a/#")
    publisher = MqttPublisher(mqtt_settings(broker), "line-a", tmp_path / "outbox.sqlite")
    try:
        from musc_edge.edge.telemetry.events import part_event

        for n in range(1, 11):
            publisher.publish("part", part_event(part(n), "line-a", "3"))
        assert subscriber.wait_for(10, 10.0)
        broker.stop()                                           # the outage
        for n in range(11, 41):
            publisher.publish("part", part_event(part(n), "line-a", "3"))
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while len(publisher.outbox) < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(publisher.outbox) >= 30                      # on disk, not only in memory
        broker.start()
        assert subscriber.wait_for(40, 30.0), f"{len(subscriber.messages)} of 40 events arrived"
        time.sleep(0.3)                                         # a duplicate would arrive by now
        seqs = [m["seq"] for m in subscriber.messages]
        assert seqs == list(range(1, 41))
        assert [m["event_id"] for m in subscriber.messages] == sorted({m["event_id"] for m in subscriber.messages})
        first = subscriber.messages[0]
        assert first["part_id"] == "P-1" and first["verdict"] == "ACCEPT" and first["calibration_version"] == "3"
        assert first["latency_ms"]["features"] == 50.0 and "image" not in first
        assert publisher.pending() == 0
    finally:
        publisher.close()
        subscriber.close()


@needs_broker
def test_events_left_in_the_outbox_go_out_after_a_restart(broker: Broker, tmp_path: Path) -> None:
    broker.stop()
    outbox = tmp_path / "outbox.sqlite"
    first = MqttPublisher(mqtt_settings(broker), "line-b", outbox)
    for n in range(1, 6):
        first.publish("alarm", {"text": f"alarm {n}", "n": n})
    deadline = time.monotonic() + 5
    while len(first.outbox) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.close(flush_s=0.0)
    broker.start()
    subscriber = Subscriber(broker.port, "musc-edge/line-b/alarm")
    second = MqttPublisher(mqtt_settings(broker), "line-b", outbox)
    try:
        assert subscriber.wait_for(5, 15.0)
        assert [m["n"] for m in subscriber.messages] == [1, 2, 3, 4, 5]
    finally:
        second.close()
        subscriber.close()


# --------------------------------------------------------------------------------- Prometheus

def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for row in text.splitlines():
        if row.startswith(f"{name}{{") and all(f'{k}="{v}"' in row for k, v in labels.items()):
            return float(row.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in the scrape")


def test_prometheus_counts_parts_acks_alarms_and_reads_pools_at_scrape_time() -> None:
    status = {"calibration_version": "4", "queue_depth": 2,
              "recipes": {"default": {"pool": {"size": 30, "capacity": 64, "oldest_age_s": 120.0,
                                               "newest_age_s": 1.5}}},
              "link": {"connected": True, "outbox_depth": 1, "alarms": ["plc_silent"]}}
    telemetry = Telemetry(TelemetrySettings(prometheus=PrometheusSettings(enabled=True, port=0)), "line-p",
                          "/nonexistent", status=lambda: status)
    try:
        assert telemetry.prometheus is not None and telemetry.mqtt is None
        for n in range(3):
            telemetry.part(part(n), "4")
        telemetry.part(part(9, Verdict.NO_VERDICT, Reason.DEADLINE), "4")
        telemetry.ack(1, late=False)
        telemetry.ack(2, late=True)
        telemetry.alarm("PLC silent")
        text = scrape(telemetry.prometheus.port)
        assert metric(text, "musc_parts_total", line="line-p", verdict="ACCEPT") == 3
        assert metric(text, "musc_parts_total", line="line-p", verdict="NO_VERDICT") == 1
        assert metric(text, "musc_verdict_reasons_total", reason="deadline") == 1
        assert metric(text, "musc_acks_total", late="true") == 1
        assert metric(text, "musc_alarms_total", line="line-p") == 1
        assert metric(text, "musc_stage_seconds_count", stage="features") == 4
        assert metric(text, "musc_stage_seconds_bucket", stage="features", le="0.05") == 4
        assert metric(text, "musc_pool_size", recipe="default") == 30
        assert metric(text, "musc_pool_oldest_age_seconds", recipe="default") == 120
        assert metric(text, "musc_calibration_version") == 4
        assert metric(text, "musc_link_up") == 1 and metric(text, "musc_alarms_active") == 1
        dashboard = (Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json").read_text()
        used = set(re.findall(r"musc_[a-z_]+", dashboard))
        assert used and all(f"\n{name}" in text or f"\n{name}{{" in text for name in used), \
            sorted(name for name in used if f"\n{name}{{" not in text)
    finally:
        telemetry.close()


def test_telemetry_is_off_by_default_and_its_keys_are_checked() -> None:
    assert not Telemetry(TelemetrySettings(), "line", "/nonexistent").enabled
    raw = {"source": {"type": "replay", "path": "x"}, "link": {"type": "zmq"},
           "telemetry": {"mqtt": {"enabled": True, "prot": 1883}}}
    with pytest.raises(ValueError, match=r"telemetry\.mqtt\.prot"):
        parse_config(raw)
    with pytest.raises(ValueError, match=r"telemetry\.prometheus\.port"):
        parse_config({**raw, "telemetry": {"prometheus": {"port": 70000}}})


# --------------------------------------------------------------------------------- a whole line

@needs_broker
@pytest.mark.slow
def test_a_line_over_modbus_publishes_one_event_per_part_in_order(toy_model, tmp_path, broker) -> None:
    from musc_edge.edge.plc_sim.modbus import ModbusPlcSimulator
    from tests.test_runtime import make_parts, raw_config, run_line

    port = free_port()
    parts = make_parts(tmp_path / "parts", 10)
    raw = raw_config(toy_model, parts, tmp_path / "line", {"type": "modbus-tcp", "port": port})
    raw["telemetry"] = {"prometheus": {"enabled": True, "port": 0},
                        "mqtt": {"enabled": True, "port": broker.port, "topic_prefix": "plant"}}
    subscriber = Subscriber(broker.port, "plant/#")
    try:
        with ModbusPlcSimulator.on_tcp("127.0.0.1", port) as plc:
            line, rows = run_line(raw)
            assert len(rows) == 10 and all(r.acked for r in rows)
            assert sorted(v.seq for v in plc.received()) == [r.seq for r in rows]
        assert subscriber.wait_for(10, 15.0)
        events = [m for m in subscriber.messages if m["kind"] == "part"]
        assert [e["seq"] for e in events] == [r.seq for r in rows]
        assert [e["part_id"] for e in events] == [r.part_id for r in rows]
        assert all(e["acked"] for e in events)
    finally:
        subscriber.close()
