"""OPC UA reject link (``type: opcua``) with asyncua: the runtime serves a small information model.

Objects/MuscEdge (string NodeIds ``ns=<urn:musc-edge:reject-link>;s=MuscEdge.<Name>``), documented in
docs/wire-protocol.md. The runtime writes LineState, Heartbeat, Pending, NewVerdict, Sequence and
LastVerdict (a VerdictRecord structure), StopLine/StopCount/StopReason; the PLC, an OPC UA client,
writes AckSeq, HeartbeatEcho, NakSeq + NakCode and StopAck. These map one to one onto the Modbus
registers, so :class:`RegisterTransport` gives both the same delivery logic. Anonymous sessions are
refused: clients log in with a configured username/password or a trusted certificate.
"""
from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from musc_edge.edge.links.base import MAX_ACK_TIMEOUT_S, LinkIOError, LinkSettings
from musc_edge.edge.links.register_map import Reg, join32, part_text, split32
from musc_edge.edge.links.register_transport import RegisterTransport

NAMESPACE = "urn:musc-edge:reject-link"
_TIMEOUT_S = 5.0
# Building the standard address space takes asyncua seconds (about 8 s on two busy cores): wait for it.
_START_TIMEOUT_S = 60.0

# Runtime-written variables: name -> (OPC UA type, register(s) they show).
RUNTIME_VARIABLES: dict[str, tuple[str, tuple[int, ...]]] = {
    "LineState": ("Int32", (Reg.LINE_STATE,)),
    "Heartbeat": ("UInt32", (Reg.HEARTBEAT,)),
    "Pending": ("UInt32", (Reg.PENDING,)),
    "NewVerdict": ("Boolean", (Reg.NEW_VERDICT,)),
    "Sequence": ("UInt32", (Reg.SEQ_HI, Reg.SEQ_LO)),
    "StopLine": ("Boolean", (Reg.STOP_LINE,)),
    "StopCount": ("UInt32", (Reg.STOP_COUNT,)),
}
# PLC-written variables: name -> (OPC UA type, first register it sets, registers).
PLC_VARIABLES: dict[str, tuple[str, int, int]] = {
    "AckSeq": ("UInt32", Reg.ACK_SEQ_HI, 2),
    "HeartbeatEcho": ("UInt32", Reg.HEARTBEAT_ECHO, 1),
    "NakSeq": ("UInt32", Reg.NAK_SEQ_HI, 2),
    "NakCode": ("UInt16", Reg.NAK_CODE, 1),
    "StopAck": ("UInt32", Reg.STOP_ACK, 1),
}
VERDICT_RECORD_FIELDS = (("Seq", "UInt32"), ("PartId", "String"), ("PartHash", "UInt32"), ("Verdict", "UInt16"),
                         ("Reason", "UInt16"), ("Flags", "UInt16"), ("CalibrationVersion", "UInt16"))


class OpcUaUser(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(min_length=1)
    password: SecretStr = Field(description="compared in constant time; keep the config file private (0600)")


class OpcUaLinkConfig(LinkSettings):
    """``link: {type: opcua, endpoint: opc.tcp://0.0.0.0:4840/musc-edge/, users: [...]}``"""

    type: Literal["opcua"] = "opcua"
    # An OPC UA client's subscription or read cycle is slower than a Modbus poll: allow a few cycles.
    ack_timeout_s: float = Field(0.25, gt=0, le=MAX_ACK_TIMEOUT_S, description=(
        "wait for the PLC's AckSeq per publication"))
    endpoint: str = Field("opc.tcp://127.0.0.1:4840/musc-edge/", description="where the server listens")
    users: list[OpcUaUser] = Field(default_factory=list, description="username/password logins")
    certificate: Path | None = Field(None, description="server certificate (DER/PEM): enables "
                                     "Basic256Sha256 Sign and SignAndEncrypt")
    private_key: Path | None = Field(None, description="the server certificate's private key")
    trusted_client_certificates: list[Path] = Field(default_factory=list,
                                                    description="client certificates allowed to log in")
    allow_unencrypted: bool = Field(True, description="also offer SecurityPolicy None (logins still required); "
                                    "false once a certificate is set, on an untrusted network")

    @model_validator(mode="after")
    def _no_anonymous(self) -> OpcUaLinkConfig:
        if not self.users and not self.trusted_client_certificates:
            raise ValueError("users: anonymous access is off; list users (username/password) or "
                             "trusted_client_certificates")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.trusted_client_certificates and self.certificate is None:
            raise ValueError("trusted_client_certificates need the server's own certificate and private_key")
        if not self.allow_unencrypted and self.certificate is None:
            raise ValueError("allow_unencrypted: false needs a certificate and private_key")
        return self


class _Logins:
    """asyncua user manager: configured username/password pairs and trusted client certificates."""

    def __init__(self, users: list[OpcUaUser], certificates: list[bytes]) -> None:
        self._passwords = {user.username: user.password.get_secret_value().encode() for user in users}
        self._certificates = certificates

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        if username is None and certificate:            # an X509 identity token (not just the channel's)
            from asyncua.crypto import uacrypto

            der = certificate if isinstance(certificate, bytes) else uacrypto.der_from_x509(certificate)
            if der in self._certificates:
                return User(role=UserRole.User, name="certificate")
            return None
        expected = self._passwords.get(username or "")
        given = password if isinstance(password, bytes) else (password or "").encode()
        if expected is not None and hmac.compare_digest(expected, given):
            return User(role=UserRole.User, name=username)
        return None                                    # anonymous or wrong: refused


class OpcUaTransport(RegisterTransport):
    """An asyncua server on its own event-loop thread; variables mirror the register image."""

    def __init__(self, config: OpcUaLinkConfig) -> None:
        super().__init__()
        self._config = config
        self.description = f"opcua {config.endpoint}"
        self._nodes: dict[str, Any] = {}
        self._plc_nodes: dict[Any, str] = {}
        self._shown: dict[str, Any] = {}
        self._record_class: Any = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        self._server = self._serve_on_own_loop(self._start, _START_TIMEOUT_S)
        self._shown.clear()
        self.published()

    async def _start(self) -> Any:
        from asyncua import Server, ua
        from asyncua.common.callback import CallbackType
        from asyncua.common.structures104 import new_struct, new_struct_field
        from asyncua.crypto import uacrypto

        config = self._config
        trusted = [uacrypto.der_from_x509(await uacrypto.load_certificate(path))
                   for path in config.trusted_client_certificates]
        server = Server(user_manager=_Logins(config.users, trusted))
        await server.init()
        server.set_endpoint(config.endpoint)
        server.set_server_name("musc-edge reject link")
        policies = [ua.SecurityPolicyType.NoSecurity] if config.allow_unencrypted else []
        tokens = [ua.UserNameIdentityToken]
        if config.certificate is not None:
            await server.load_certificate(str(config.certificate))
            await server.load_private_key(str(config.private_key))
            policies += [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                         ua.SecurityPolicyType.Basic256Sha256_Sign]
            if trusted:
                tokens.append(ua.X509IdentityToken)
        server.set_security_policy(policies)
        server.set_identity_tokens(tokens)
        idx = await server.register_namespace(NAMESPACE)
        record_type, _ = await new_struct(server, idx, "VerdictRecord", [
            new_struct_field(name, getattr(ua.VariantType, kind)) for name, kind in VERDICT_RECORD_FIELDS])
        classes = await server.load_data_type_definitions()
        self._record_class = classes.get("VerdictRecord") or getattr(ua, "VerdictRecord")
        root = await server.nodes.objects.add_object(ua.NodeId("MuscEdge", idx), ua.QualifiedName("MuscEdge", idx))

        async def variable(name: str, value: Any, kind: Any, datatype: Any = None) -> Any:
            return await root.add_variable(ua.NodeId(f"MuscEdge.{name}", idx), ua.QualifiedName(name, idx),
                                           ua.Variant(value, kind), datatype=datatype)

        nodes = {name: await variable(name, _zero(kind), getattr(ua.VariantType, kind))
                 for name, (kind, _) in RUNTIME_VARIABLES.items()}
        nodes["StopReason"] = await variable("StopReason", "", ua.VariantType.String)
        nodes["LastVerdict"] = await variable("LastVerdict", self._record_class(), ua.VariantType.ExtensionObject,
                                              record_type.nodeid)
        for name, (kind, _, _) in PLC_VARIABLES.items():
            nodes[name] = await variable(name, _zero(kind), getattr(ua.VariantType, kind))
            await nodes[name].set_writable()
        self._nodes = nodes
        self._plc_nodes = {nodes[name].nodeid: name for name in PLC_VARIABLES}
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_plc_write)
        await server.start()
        return server

    def close(self) -> None:
        self._stop_serving(lambda server: server.stop(), _TIMEOUT_S)

    # ------------------------------------------------------------------ runtime -> variables

    def published(self) -> None:
        """Write the variables whose registers changed (LastVerdict before Sequence and NewVerdict)."""
        loop = self._loop
        if loop is None or self._server is None:
            return
        v = self.image.snapshot()
        wanted: dict[str, Any] = {
            "LastVerdict": self._record_class(
                Seq=join32(v[Reg.SEQ_HI], v[Reg.SEQ_LO]),
                PartId=part_text(v[Reg.PART_TEXT:Reg.PART_TEXT + 32]),
                PartHash=join32(v[Reg.PART_HASH_HI], v[Reg.PART_HASH_LO]), Verdict=v[Reg.VERDICT],
                Reason=v[Reg.REASON], Flags=v[Reg.FLAGS], CalibrationVersion=v[Reg.CALIBRATION]),
            "StopReason": part_text(v[Reg.STOP_TEXT:Reg.STOP_TEXT + 32]),
        }
        for name, (kind, registers) in RUNTIME_VARIABLES.items():
            raw = join32(v[registers[0]], v[registers[1]]) if len(registers) == 2 else v[registers[0]]
            wanted[name] = bool(raw) if kind == "Boolean" else raw
        changed = {name: value for name, value in wanted.items() if self._shown.get(name) != value}
        if not changed:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._write(changed), loop).result(_TIMEOUT_S)
        except Exception as exc:
            raise LinkIOError(f"{self.description}: cannot update variables: {exc}") from exc
        self._shown.update(changed)

    async def _write(self, changed: dict[str, Any]) -> None:
        from asyncua import ua

        order = ["LastVerdict", *[name for name in changed if name not in ("LastVerdict", "Sequence", "NewVerdict")],
                 "Sequence", "NewVerdict"]
        for name in order:
            if name not in changed:
                continue
            value = changed[name]
            if name == "LastVerdict":
                variant = ua.Variant(value, ua.VariantType.ExtensionObject)
            elif name == "StopReason":
                variant = ua.Variant(value, ua.VariantType.String)
            else:
                variant = ua.Variant(value, getattr(ua.VariantType, RUNTIME_VARIABLES[name][0]))
            await self._nodes[name].write_value(ua.DataValue(variant))

    # ------------------------------------------------------------------ PLC writes (event loop)

    async def _on_plc_write(self, event: Any, _dispatcher: Any) -> None:
        from asyncua import ua

        if not getattr(event, "is_external", True):
            return
        results = list(event.response_params or [])
        for i, item in enumerate(event.request_params.NodesToWrite):
            name = self._plc_nodes.get(item.NodeId)
            if name is None or (i < len(results) and not results[i].is_good()):
                continue
            _, first, count = PLC_VARIABLES[name]
            value = int(item.Value.Value.Value or 0)
            self.image.plc_write(first, split32(value) if count == 2 else [value & 0xFFFF])
        if self._shown.get("NewVerdict") and not self.image.snapshot()[Reg.NEW_VERDICT]:
            # Acknowledged: clear NewVerdict before the PLC's next read, as the Modbus register does.
            await self._nodes["NewVerdict"].write_value(ua.DataValue(ua.Variant(False, ua.VariantType.Boolean)))
            self._shown["NewVerdict"] = False


def _zero(kind: str) -> Any:
    return False if kind == "Boolean" else 0
