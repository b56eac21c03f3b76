"""PLC simulator for the OPC UA link: an asyncua client scanning the runtime's MuscEdge object.

Each scan reads Epoch, EpochAck, Heartbeat, HeartbeatCount, NewVerdict, LastVerdict and StopCount in one Read
service call, then writes EpochAck, HeartbeatEcho, AckSeq (or NakCode + NakSeq), StopAck as docs/wire-protocol.md
describes. It connects with Basic256Sha256 SignAndEncrypt and a client certificate it generates in memory
(``security="none"`` for a server that allows SecurityPolicy None).
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from musc_edge.edge.links.framing import NakCode
from musc_edge.edge.links.opcua_link import NAMESPACE
from musc_edge.edge.links.register_map import PublishedVerdict
from musc_edge.edge.plc_sim.polling import PlcView, PollingPlcSimulator

_TIMEOUT_S = 5.0            # one request
_CONNECT_TIMEOUT_S = 30.0   # log in and load the VerdictRecord type: slow on a busy machine


class OpcUaPlcSimulator(PollingPlcSimulator):
    """Logs in to the runtime's OPC UA server at ``endpoint`` as ``username``/``password``.

    Scans every 20 ms by default: an OPC UA client's read is heavier than a Modbus poll.
    """

    def __init__(self, endpoint: str, username: str, password: str, security: str = "encrypt",
                 **options: Any) -> None:
        if security not in ("encrypt", "none"):
            raise ValueError(f"security={security!r} must be 'encrypt' or 'none'")
        options.setdefault("scan_s", 0.02)
        super().__init__(**options)
        self.address, self._username, self._password = endpoint, username, password
        self._security = security
        self._client_keys: tuple[bytes, bytes] | None = None
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="plc-sim opcua loop", daemon=True)
        self._loop_thread.start()
        self._client: Any = None
        self._nodes: dict[str, Any] = {}

    def _call(self, coroutine: Any, timeout_s: float = _TIMEOUT_S) -> Any:
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise ConnectionError(f"OPC UA request to {self.address} timed out") from exc
        except Exception as exc:
            if isinstance(exc, (OSError, ConnectionError)):
                raise
            raise ConnectionError(f"OPC UA request to {self.address} failed: {exc!r}") from exc

    async def _open(self) -> None:
        from asyncua import Client

        client = Client(self.address, timeout=_TIMEOUT_S)
        client.set_user(self._username)
        client.set_password(self._password)
        if self._security == "encrypt":
            from asyncua import ua
            from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

            from asyncua.crypto.uacrypto import CertProperties

            certificate, key = await asyncio.get_running_loop().run_in_executor(None, self._keys,
                                                                                client.application_uri)
            await client.set_security(SecurityPolicyBasic256Sha256, certificate, CertProperties(key, extension="pem"),
                                      mode=ua.MessageSecurityMode.SignAndEncrypt)
        await client.connect()
        try:
            await client.load_data_type_definitions()
            idx = await client.get_namespace_index(NAMESPACE)
            names = ("Epoch", "EpochAck", "Heartbeat", "HeartbeatCount", "NewVerdict", "LastVerdict", "StopCount",
                     "AckSeq", "HeartbeatEcho", "NakSeq", "NakCode", "StopAck")
            self._nodes = {name: client.get_node(f"ns={idx};s=MuscEdge.{name}") for name in names}
        except Exception:
            await client.disconnect()
            raise
        self._client = client

    def _keys(self, application_uri: str) -> tuple[bytes, bytes]:
        """This simulator's client certificate (DER) and key (PEM), generated once, kept in memory."""
        if self._client_keys is None:
            import tempfile

            from musc_edge.edge.links.opcua_link import ensure_certificate

            with tempfile.TemporaryDirectory() as folder:
                cert_path, key_path = ensure_certificate(Path(folder), application_uri)
                self._client_keys = cert_path.read_bytes(), key_path.read_bytes()
        return self._client_keys

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.disconnect()
            except Exception:
                pass                                  # the server is gone already

    def _connect(self) -> None:
        self._call(self._open(), _CONNECT_TIMEOUT_S)

    def _disconnect(self) -> None:
        if self._loop.is_running():
            try:
                self._call(self._close())
            except ConnectionError:
                self._client = None

    def stop(self) -> None:
        super().stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(_TIMEOUT_S)

    def _read(self) -> PlcView:
        async def read() -> list[Any]:
            n = self._nodes
            return await self._client.read_values([n[name] for name in (
                "Heartbeat", "NewVerdict", "LastVerdict", "StopCount", "Epoch", "EpochAck", "HeartbeatCount")])

        heartbeat, new, record, stop_count, epoch, epoch_acked, count = self._call(read())
        verdict = PublishedVerdict(seq=record.Seq, verdict=record.Verdict, reason=record.Reason, flags=record.Flags,
                                   part_id=record.PartId or "", calibration=record.CalibrationVersion,
                                   epoch=record.Epoch)
        return PlcView(heartbeat=int(heartbeat), new_verdict=bool(new), verdict=verdict, stop_count=int(stop_count),
                       epoch=int(epoch), epoch_acked=int(epoch_acked), heartbeat_count=int(count))

    def _write(self, values: dict[str, tuple[int, str]]) -> None:
        from asyncua import ua

        async def write() -> None:
            nodes = [self._nodes[name] for name in values]
            variants = [ua.DataValue(ua.Variant(value, getattr(ua.VariantType, kind)))
                        for value, kind in values.values()]
            await self._client.write_values(nodes, variants)

        self._call(write())

    def _write_ack(self, seq: int) -> None:
        self._write({"AckSeq": (seq, "UInt32")})

    def _write_nak(self, seq: int, code: NakCode) -> None:
        self._write({"NakCode": (int(code), "UInt16"), "NakSeq": (seq, "UInt32")})

    def _write_epoch_ack(self, epoch: int) -> None:
        self._write({"EpochAck": (epoch, "UInt32")})

    def _write_heartbeat_echo(self, counter: int) -> None:
        self._write({"HeartbeatEcho": (counter, "UInt32")})

    def _write_stop_ack(self, count: int) -> None:
        self._write({"StopAck": (count, "UInt32")})
