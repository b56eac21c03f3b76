"""A throwaway mosquitto broker and a collecting subscriber, for tests and benches (not used by the line)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


def mosquitto_binary() -> str | None:
    """The mosquitto executable (Debian installs it in /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalBroker:
    """mosquitto on 127.0.0.1:<port> with persistence, so a restart keeps subscribers' queued messages."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.binary, self.port = binary, port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {folder}/\nlog_dest none\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalBroker:
        self.process = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


class CollectingSubscriber:
    """A persistent-session QoS 1 subscriber keeping every JSON payload in arrival order."""

    def __init__(self, port: int, topic: str, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"collector-{port}",
                             clean_session=False)
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        client.on_connect = lambda c, *args: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *args: subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self._client = client
        if not subscribed.wait(10):
            self.close()
            raise RuntimeError("MQTT subscription not confirmed")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._changed:
            self.messages.append(json.loads(message.payload))
            self._changed.notify_all()

    def wait_for(self, count: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.messages) >= count, timeout_s)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
