"""MQTT publishing of part and alarm events (paho-mqtt) through a durable outbox.

The line's hot path only puts the event on an in-memory queue. One thread moves queued events into
the SQLite outbox and publishes the outbox head in id order, QoS 1 by default, deleting events once
the broker has acknowledged them. While the broker is away events pile up on disk; when it is back
they go out oldest first. Each event carries ``event_id`` (the outbox id) so a consumer can drop the
rare duplicate an interrupted acknowledgement can cause.
"""
from __future__ import annotations

import json
import logging
import queue
from collections import deque
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from musc_edge.edge.telemetry.config import MqttSettings
from musc_edge.edge.telemetry.outbox import Outbox

log = logging.getLogger(__name__)

_BATCH = 100
_ACK_TIMEOUT_S = 5.0


class MqttPublisher:
    """Publishes events to ``<topic_prefix>/<line>/<kind>``; :meth:`publish` never blocks."""

    def __init__(self, settings: MqttSettings, line: str, outbox_path: str | Path) -> None:
        import paho.mqtt.client as mqtt

        self.settings, self.line = settings, line
        self.outbox = Outbox(outbox_path, settings.outbox_max_events)
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self.published = 0
        self._inflight: deque[tuple[int, Any]] = deque()     # (event id, paho MQTTMessageInfo), in order
        self._handed_through = 0                              # highest event id handed to paho
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=settings.client_id or f"musc-edge-{line}")
        if settings.username:
            client.username_pw_set(settings.username,
                                   settings.password.get_secret_value() if settings.password else None)
        if settings.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = lambda *args: self._connected.set() if not args[3].is_failure else None
        client.on_disconnect = lambda *args: self._connected.clear()
        self._client = client
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)
        client.loop_start()
        self._thread = threading.Thread(target=self._run, name="telemetry-mqtt", daemon=True)
        self._thread.start()

    def publish(self, kind: str, event: dict[str, Any]) -> None:
        """Queue one event (``kind``: part or alarm); returns at once."""
        self._queue.put((f"{self.settings.topic_prefix}/{self.line}/{kind}", event))

    def pending(self) -> int:
        """Events not yet acknowledged by the broker (queued in memory or in the outbox)."""
        return self._queue.qsize() + len(self.outbox)

    def close(self, flush_s: float = 2.0) -> None:
        """Stop after up to ``flush_s`` of trying to empty the outbox; what is left stays on disk."""
        deadline = time.monotonic() + flush_s
        while self.pending() and self._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._queue.put(None)
        self._thread.join(_ACK_TIMEOUT_S + 1)
        self._client.disconnect()
        self._client.loop_stop()
        self.outbox.close()

    # ------------------------------------------------------------------ the publisher thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._store_queued(timeout_s=0.05)
                if self._connected.is_set():
                    self._publish_head()
            except Exception:   # keep going (an outbox that cannot be written, a paho fault); never die silently
                log.exception("MQTT telemetry failed; retrying")
                time.sleep(0.5)

    def _store_queued(self, timeout_s: float) -> None:
        items: list[tuple[str, dict[str, Any]]] = []
        try:
            item = self._queue.get(timeout=timeout_s)
            while item is not None:
                items.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        if items:
            self.outbox.append([(topic, json.dumps(event, separators=(",", ":")).encode()) for topic, event in items])

    def _publish_head(self) -> None:
        """Hand the next outbox events to paho (once each), then forget those the broker acknowledged.

        paho keeps what it was handed across reconnects and sends it again itself, so an event is
        handed over once per process; only after a restart does the outbox's remainder go out again.
        """
        room = _BATCH - len(self._inflight)
        if room > 0:
            for event_id, topic, payload in self.outbox.head_after(self._handed_through, room):
                body = payload[:-1] + f',"event_id":{event_id}}}'.encode()
                self._inflight.append((event_id, self._client.publish(topic, body, qos=self.settings.qos)))
                self._handed_through = event_id
        done = None
        while self._inflight and self._inflight[0][1].is_published():
            done = self._inflight.popleft()[0]
            self.published += 1
        if done is not None:
            self.outbox.remove_through(done)
        elif self._inflight:
            self._stop.wait(0.005)
