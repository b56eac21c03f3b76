"""The OPC UA reject link: a real asyncua server (the runtime) and client (the simulated PLC) on loopback,
through the fault tests of the framed links. An asyncua server takes seconds to build its address space,
so one link serves the tests (in order), and only the restart test starts a second one."""
from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any, Iterator

import pytest

pytest.importorskip("asyncua")

from musc_edge.edge.links import PlantLink, open_link, parse_link_config  # noqa: E402
from musc_edge.edge.links.framing import NakCode  # noqa: E402
from musc_edge.edge.links.opcua_link import NAMESPACE  # noqa: E402
from musc_edge.edge.plc_sim.opcua import OpcUaPlcSimulator  # noqa: E402
from musc_edge.edge.record import Reason, Verdict  # noqa: E402
from tests.test_modbus_link import FAST, Events  # noqa: E402

pytestmark = pytest.mark.slow
USERS = [{"username": "plc", "password": "s3cret"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


EPOCH = 0x5EED      # a restarted runtime keeps its ledger's epoch


def config(endpoint: str, **settings: Any) -> dict[str, Any]:
    return {"type": "opcua", "endpoint": endpoint, "users": USERS, **FAST, "ack_timeout_s": 0.2, **settings}


def _soon(seconds: float = 3.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[PlantLink, OpcUaPlcSimulator, Events, str]]:
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/musc-edge/"
    events = Events()
    with open_link(config(endpoint), epoch=EPOCH, **events.callbacks()) as link:
        with OpcUaPlcSimulator(endpoint, "plc", "s3cret") as sim:
            assert sim.wait_for(lambda c: c.heartbeats >= 1, 30.0), \
                f"the simulated PLC never logged in: {link.health()} {events.alarms} {sim.link_errors}"
            yield link, sim, events, endpoint


def test_a_verdict_is_published_as_a_structure_and_acked_once(served) -> None:
    link, sim, events, endpoint = served
    link.set_calibration_version(12)
    result = link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, _soon())
    assert result.acked and events.acks == [(1, False)]
    [got] = sim.received()
    assert (got.seq, got.part_id, got.verdict, got.reason_label, got.late) == (1, "P-1", "REJECT", "anomaly", False)
    record, sequence, new = _read(endpoint, "LastVerdict", "Sequence", "NewVerdict")
    assert (record.Seq, record.PartId, record.Verdict, record.Reason, record.CalibrationVersion) == \
        (1, "P-1", 2, int(Reason.ANOMALY), 12)
    assert sequence == 1 and new is False


def test_nak_is_retried_until_acked(served) -> None:
    link, sim, events, _ = served
    naks = link.health().naks
    sim.refuse_next(2, NakCode.BUSY)
    result = link.send(2, "P-2", Verdict.ACCEPT, Reason.OK, _soon())
    assert result.acked and result.attempts == 3 and link.health().naks == naks + 2
    assert [r.seq for r in sim.received()] == [1, 2]


def test_anonymous_and_wrong_passwords_are_refused(served) -> None:
    from asyncua.ua.uaerrors import UaError

    _, _, _, endpoint = served

    async def login(user: str | None, password: str | None) -> None:
        client = await encrypted_client(endpoint, user, password)
        await client.connect()
        await client.disconnect()

    for user, password in ((None, None), ("plc", "wrong"), ("intruder", "s3cret")):
        with pytest.raises((UaError, OSError, asyncio.TimeoutError, ConnectionError)):
            asyncio.run(login(user, password))


def test_the_plc_cannot_write_the_runtimes_variables(served) -> None:
    from asyncua import ua
    from asyncua.ua.uaerrors import UaError

    _, _, _, endpoint = served

    async def write() -> None:
        client = await encrypted_client(endpoint)
        await client.connect()
        try:
            idx = await client.get_namespace_index(NAMESPACE)
            node = client.get_node(f"ns={idx};s=MuscEdge.Sequence")
            await node.write_value(ua.DataValue(ua.Variant(99, ua.VariantType.UInt32)))
        finally:
            await client.disconnect()

    with pytest.raises(UaError):
        asyncio.run(write())


def test_plc_silence_delivers_everything_once_in_order_and_reports_late_acks(served) -> None:
    link, sim, events, _ = served
    before = len(events.acks)
    sim.silence(1.2)
    time.sleep(0.1)                                          # let a scan already under way finish
    results = {seq: link.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, _soon(0.15)) for seq in range(3, 7)}
    assert events.wait_acks(before + 4, 10.0)
    assert [r.seq for r in sim.received()] == list(range(1, 7))
    assert not results[3].acked and all(late for seq, late in events.acks[before:])
    assert any(r.late for r in sim.received()[2:])
    assert any("PLC silent" in text for text in events.alarms)
    assert sim.counters().out_of_order == 0


def test_stop_line_is_raised_with_its_reason(served) -> None:
    link, sim, _, endpoint = served
    link.send_stop_line("scanner lost")
    deadline = _soon(5.0)
    while sim.stop_requests < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.stop_requests == 1
    stop, reason, state = _read(endpoint, "StopLine", "StopReason", "LineState")
    assert stop is True and reason == "scanner lost" and state == 2


def test_runtime_restart_resends_unacked_rows_which_the_plc_deduplicates(served) -> None:
    """Last of the module's tests: it replaces the served link by a restarted one on the same endpoint."""
    link, sim, _, endpoint = served
    sim.silence(0.5)
    time.sleep(0.1)
    assert not link.send(7, "P-7", Verdict.REJECT, Reason.ANOMALY, _soon(0.1)).acked   # the ledger keeps it unacked
    link.close()
    events = Events()
    with open_link(config(endpoint), epoch=EPOCH, **events.callbacks()) as restarted:
        restarted.resend(7, "P-7", Verdict.REJECT, Reason.ANOMALY)
        restarted.resend(6, "P-6", Verdict.REJECT, Reason.ANOMALY)       # acked before the restart
        assert restarted.send(8, "P-8", Verdict.ACCEPT, Reason.OK, _soon(30.0)).acked
        assert events.wait_acks(3)
    assert sorted(events.acks) == [(6, True), (7, True), (8, False)]
    seqs = [r.seq for r in sim.received()]
    assert seqs == sorted(set(seqs)) and seqs[-2:] == [7, 8]
    assert sim.counters().duplicates >= 1 and sim.counters().out_of_order == 0


@pytest.mark.parametrize("raw,named", [
    ({"type": "opcua"}, "users"),
    ({"type": "opcua", "users": [{"username": "plc"}]}, "link.users.0.password"),
    ({"type": "opcua", "users": USERS, "certificate": "server.der"}, "private_key"),
    ({"type": "opcua", "users": [*USERS, {"username": "hmi", "password": "x"}]}, "plc_user"),
    ({"type": "opcua", "users": USERS, "plc_user": "admin"}, "plc_user"),
])
def test_bad_opcua_config_names_the_key(raw: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        parse_link_config(raw)


def _read(endpoint: str, *names: str) -> list[Any]:

    async def read() -> list[Any]:
        client = await encrypted_client(endpoint)
        await client.connect()
        try:
            await client.load_data_type_definitions()
            idx = await client.get_namespace_index(NAMESPACE)
            return await client.read_values([client.get_node(f"ns={idx};s=MuscEdge.{n}") for n in names])
        finally:
            await client.disconnect()

    return asyncio.run(read())


_CLIENT_KEYS: list[tuple[bytes, bytes]] = []


async def encrypted_client(endpoint: str, user: str | None = "plc", password: str | None = "s3cret") -> Any:
    """An asyncua client set up for Basic256Sha256 SignAndEncrypt (the server's only policy by default) with a
    client certificate generated once per test run; not yet connected."""
    import tempfile
    from pathlib import Path

    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
    from asyncua.crypto.uacrypto import CertProperties

    from musc_edge.edge.links.opcua_link import ensure_certificate

    client = Client(endpoint, timeout=5)
    if not _CLIENT_KEYS:
        with tempfile.TemporaryDirectory() as folder:
            cert, key = ensure_certificate(Path(folder), client.application_uri)
            _CLIENT_KEYS.append((cert.read_bytes(), key.read_bytes()))
    cert_der, key_pem = _CLIENT_KEYS[0]
    if user is not None:
        client.set_user(user)
        client.set_password(password or "")
    await client.set_security(SecurityPolicyBasic256Sha256, cert_der, CertProperties(key_pem, extension="pem"),
                              mode=ua.MessageSecurityMode.SignAndEncrypt)
    return client
