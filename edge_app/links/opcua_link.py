"""OPC UA reject link (``type: opcua``) with asyncua: the runtime serves a small information model.

Objects/MuscEdge (string NodeIds ``ns=<urn:musc-edge:reject-link>;s=MuscEdge.<Name>``), documented in
docs/wire-protocol.md. The runtime writes LineState, Heartbeat, Pending, NewVerdict, Sequence and
LastVerdict (a VerdictRecord structure), StopLine/StopCount/StopReason; the PLC, an OPC UA client,
writes AckSeq, HeartbeatEcho, NakSeq + NakCode and StopAck. These map one to one onto the Modbus
registers, so :class:`RegisterTransport` gives both the same delivery logic. Anonymous sessions are
refused: clients log in with a configured username/password or a trusted certificate.

Security by default: only Basic256Sha256 SignAndEncrypt is offered (the password never crosses the wire in
clear); without a configured certificate the server generates a self-signed one (10 years) into
``<storage.dir>/opcua/`` and keeps it. Only the PLC's login (``plc_user``) or a trusted client certificate may
write, and only from one session at a time: another session's write is refused (BadUserAccessDenied) and
raises the ``foreign_writer`` alarm, until the PLC's session is gone.
"""
from __future__ import annotations

import asyncio
import hmac
import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from musc_edge.edge.links.base import MAX_ACK_TIMEOUT_S, LinkIOError, LinkSettings
from musc_edge.edge.links.library_logs import quiet_asyncua
from musc_edge.edge.links.register_map import Reg, join32, part_text, split32
from musc_edge.edge.links.register_transport import RegisterTransport

NAMESPACE = "urn:musc-edge:reject-link"
_TIMEOUT_S = 5.0
# Building the standard address space takes asyncua seconds (about 8 s on two busy cores): wait for it.
_START_TIMEOUT_S = 60.0

# Runtime-written variables: name -> (OPC UA type, register(s) they show).
RUNTIME_VARIABLES: dict[str, tuple[str, tuple[int, ...]]] = {
    "LineState": ("Int32", (Reg.LINE_STATE,)),
    "Epoch": ("UInt32", (Reg.EPOCH_HI, Reg.EPOCH_LO)),
    "Heartbeat": ("UInt32", (Reg.HEARTBEAT,)),
    "HeartbeatCount": ("UInt32", (Reg.HEARTBEAT_COUNT,)),
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
    "EpochAck": ("UInt32", Reg.EPOCH_ACK_HI, 2),
}
VERDICT_RECORD_FIELDS = (("Seq", "UInt32"), ("PartId", "String"), ("PartHash", "UInt32"), ("Verdict", "UInt16"),
                         ("Reason", "UInt16"), ("Flags", "UInt16"), ("CalibrationVersion", "UInt16"),
                         ("Epoch", "UInt32"))
CERTIFICATE_FOLDER = "opcua"            # under storage.dir: the generated server certificate and key
APPLICATION_URI = "urn:freeopcua:python:server"


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
    allow_unencrypted: bool = Field(False, description="also offer SecurityPolicy None (passwords then cross "
                                    "the network in clear): only on an isolated test bench")
    plc_user: str | None = Field(None, description="the login that may write AckSeq, HeartbeatEcho, NakSeq, "
                                 "NakCode, StopAck, EpochAck; default: the only entry of users")

    @model_validator(mode="after")
    def _no_anonymous(self) -> OpcUaLinkConfig:
        if not self.users and not self.trusted_client_certificates:
            raise ValueError("users: anonymous access is off; list users (username/password) or "
                             "trusted_client_certificates")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        names = [user.username for user in self.users]
        if self.plc_user is not None and self.plc_user not in names:
            raise ValueError(f"plc_user: {self.plc_user!r} is not one of users ({', '.join(names) or 'none'})")
        if self.plc_user is None and len(names) > 1:
            raise ValueError(f"plc_user: name the PLC's login among users ({', '.join(names)}); only it may "
                             "write the acknowledgements")
        return self

    @property
    def writer(self) -> str | None:
        """The login allowed to write (None: only trusted client certificates)."""
        return self.plc_user or (self.users[0].username if len(self.users) == 1 else None)


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


CERTIFICATE_LOGIN = "certificate"      # the User name a trusted client certificate logs in as


class _PlcWritesOnly:
    """asyncua permission ruleset: a User may do what the standard ruleset allows, but a Write request only as
    the PLC (its login or a trusted certificate) and from one session at a time (the first that writes, until
    its session is gone)."""

    def __init__(self, transport: OpcUaTransport, writer: str | None) -> None:
        from asyncua import ua
        from asyncua.crypto.permission_rules import SimpleRoleRuleset

        self._standard = SimpleRoleRuleset()
        self._write_request = ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)
        self._writers = {name for name in (writer, CERTIFICATE_LOGIN) if name}
        self._transport = transport
        self._session_user: Any = None         # the User object of the PLC's session (one per session)

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        if not self._standard.check_validity(user, action_type_id, body):
            return False
        if action_type_id != self._write_request:
            return True
        name = getattr(user, "name", None)
        if name not in self._writers:
            self._transport.refuse_writer(f"login {name!r}", f"only {' or '.join(sorted(self._writers))} may write")
            return False
        if self._session_user is not None and self._session_user is not user and \
                self._transport.session_alive(self._session_user):
            self._transport.refuse_writer(f"another session of {name!r}",
                                          "the PLC's session is open (one writer at a time)")
            return False
        self._session_user = user
        return True


def ensure_certificate(folder: Path, application_uri: str = APPLICATION_URI) -> tuple[Path, Path]:
    """The certificate (DER) and private key (PEM, mode 0600) in ``folder``, generated (self-signed, RSA 2048,
    SHA-256, 10 years, for ``application_uri``) when either is missing."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key, \
        generate_self_signed_app_certificate

    cert_path, key_path = folder / "server-certificate.der", folder / "server-key.pem"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_private_key()
    host = socket.gethostname()
    cert = generate_self_signed_app_certificate(
        key, "musc-edge reject link", {"organizationName": "musc-edge"},
        [x509.UniformResourceIdentifier(application_uri), x509.DNSName(host)],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=3650)
    _write_private(key_path, dump_private_key_as_pem(key))
    _write_private(cert_path, cert.public_bytes(Encoding.DER), mode=0o644)
    return cert_path, key_path


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode``."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)


class OpcUaTransport(RegisterTransport):
    """An asyncua server on its own event-loop thread; variables mirror the register image."""

    def __init__(self, config: OpcUaLinkConfig, storage_dir: str | Path | None = None) -> None:
        super().__init__()
        self._config = config
        self._storage_dir = None if storage_dir is None else Path(storage_dir)
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
        quiet_asyncua()
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
        certificate, private_key = await asyncio.get_running_loop().run_in_executor(None, self._certificate)
        await server.load_certificate(certificate)
        await server.load_private_key(private_key, None, "pem" if isinstance(private_key, bytes) else None)
        policies = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
        if config.allow_unencrypted:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        tokens = [ua.UserNameIdentityToken] + ([ua.X509IdentityToken] if trusted else [])
        self._iserver = server.iserver
        server.set_security_policy(policies, permission_ruleset=_PlcWritesOnly(self, config.writer))
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

    def _certificate(self) -> tuple[Path | bytes, Path | bytes]:
        """The configured certificate and key, else those kept in the storage dir (generated once), else a
        new pair in memory (no storage dir: tests)."""
        config = self._config
        if config.certificate is not None and config.private_key is not None:
            return config.certificate, config.private_key
        if self._storage_dir is not None:
            return ensure_certificate(self._storage_dir / CERTIFICATE_FOLDER)
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            cert_path, key_path = ensure_certificate(Path(folder))
            return cert_path.read_bytes(), key_path.read_bytes()

    def session_alive(self, user: Any) -> bool:
        """Whether the session that logged in as ``user`` (a User object, one per session) is still open."""
        sessions = getattr(getattr(self, "_iserver", None), "_external_sessions", None)
        if sessions is None:
            return True                             # unknown: keep the PLC's session pinned
        return any(getattr(session, "user", None) is user for session in list(sessions.values()))

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
                Reason=v[Reg.REASON], Flags=v[Reg.FLAGS], CalibrationVersion=v[Reg.CALIBRATION],
                Epoch=join32(v[Reg.EPOCH_HI], v[Reg.EPOCH_LO])),
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
            try:
                value = int(item.Value.Value.Value or 0)
                self.image.plc_write(first, split32(value) if count == 2 else [value & 0xFFFF])
            except (TypeError, ValueError, OverflowError) as exc:     # WriteRefused: an AckSeq ahead of Sequence
                self.refuse_writer(f"the PLC's session ({name})", str(exc))
        if self._shown.get("NewVerdict") and not self.image.snapshot()[Reg.NEW_VERDICT]:
            # Acknowledged: clear NewVerdict before the PLC's next read, as the Modbus register does.
            await self._nodes["NewVerdict"].write_value(ua.DataValue(ua.Variant(False, ua.VariantType.Boolean)))
            self._shown["NewVerdict"] = False


def _zero(kind: str) -> Any:
    return False if kind == "Boolean" else 0
