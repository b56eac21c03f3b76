"""Who may acknowledge (issue 21, rows 4-6 and item 6): nothing a rogue peer writes is taken as an acknowledgement.

Modbus/TCP (no login): only the PLC's connection writes (``link.allow_clients`` or the first client that polls);
an ACK_SEQ counts only when written equal to the published SEQ after its publication; the heartbeat is a nonce.
OPC UA: SignAndEncrypt only by default, with a certificate generated into the storage dir; only the PLC's login
writes, from one session. Real servers on 127.0.0.1 (a second loopback address, 127.0.0.2, plays another host).
"""
from __future__ import annotations

import asyncio
import socket
import stat
import threading
import time
from contextlib import ExitStack
from typing import Any

import pytest

pytest.importorskip("pymodbus")

from pymodbus.client import ModbusTcpClient  # noqa: E402

from musc_edge.edge.links import open_link, parse_link_config  # noqa: E402
from musc_edge.edge.links.register_map import Reg, join32, split32  # noqa: E402
from musc_edge.edge.plc_sim.modbus import ModbusPlcSimulator  # noqa: E402
from musc_edge.edge.record import Reason, Verdict  # noqa: E402
from tests.test_modbus_link import FAST, Events  # noqa: E402

OTHER_HOST = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client(port: int, source: str | None = None) -> ModbusTcpClient:
    rogue = ModbusTcpClient("127.0.0.1", port=port, timeout=1.0, retries=0,
                            source_address=None if source is None else (source, 0))
    assert rogue.connect()
    return rogue


class Rogue:
    """A second Modbus client looping in a thread: ``mode`` "ack" writes ACK_SEQ = SEQ + 1 ahead of the PLC
    (t08's forge), "echo" copies HEARTBEAT to HEARTBEAT_ECHO. Counts what the server let through."""

    def __init__(self, rogue: ModbusTcpClient, mode: str) -> None:
        self.rogue, self.mode = rogue, mode
        self.accepted = self.refused = 0
        self.codes: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Rogue:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            read = self.rogue.read_holding_registers(0, count=29)
            if read.isError():
                continue
            v = read.registers
            if self.mode == "ack":
                written = self.rogue.write_registers(Reg.ACK_SEQ_HI, split32(join32(v[Reg.SEQ_HI], v[Reg.SEQ_LO]) + 1))
            else:
                written = self.rogue.write_register(Reg.HEARTBEAT_ECHO, v[Reg.HEARTBEAT])
            if written.isError():
                self.refused += 1
                self.codes.add(written.exception_code)
            else:
                self.accepted += 1
            self._stop.wait(0.003)


def _send_all(link: Any, seqs: range) -> None:
    for seq in seqs:
        verdict, reason = (Verdict.REJECT, Reason.ANOMALY) if seq % 2 else (Verdict.ACCEPT, Reason.OK)
        link.send(seq, f"P-{seq}", verdict, reason, time.monotonic() + 2.0)


@pytest.mark.parametrize("rogue_host", [OTHER_HOST, None], ids=["another host", "same host"])
def test_a_second_client_pre_acknowledging_the_next_seq_acknowledges_nothing(rogue_host: str | None) -> None:
    """Row 4: before, 16/16 rows acked in the ledger while the PLC saw 0 of them."""
    port, events = free_port(), Events()
    with ExitStack() as stack:
        link = stack.enter_context(open_link({"type": "modbus-tcp", "port": port, **FAST}, **events.callbacks()))
        plc = stack.enter_context(ModbusPlcSimulator.on_tcp("127.0.0.1", port))
        _send_all(link, range(1, 3))                                 # the PLC polls first: it is the PLC
        rogue = stack.enter_context(Rogue(stack.enter_context(_closing(client(port, rogue_host))), "ack"))
        _send_all(link, range(3, 15))
        stack.close()
        taken = {v.seq for v in plc.received()}
    assert sorted(seq for seq, _ in events.acks) == list(range(1, 15))
    assert {seq for seq, _ in events.acks} <= taken                   # every ack is one the PLC took
    assert rogue.accepted == 0 and rogue.refused > 0 and rogue.codes == {1}    # exception 01: not the PLC
    assert any("write from" in text and "refused" in text for text in events.alarms)


def test_a_rogue_echoing_heartbeats_does_not_keep_a_gone_plc_connected() -> None:
    """Row 5: before, the link showed connected and no plc_silent alarm was raised."""
    port, events = free_port(), Events()
    with ExitStack() as stack:
        link = stack.enter_context(open_link({"type": "modbus-tcp", "port": port, **FAST}, **events.callbacks()))
        plc = ModbusPlcSimulator.on_tcp("127.0.0.1", port).start()
        assert plc.wait_for(lambda c: c.heartbeats >= 2, 5.0)
        rogue = client(port)                                        # same host, connected while the PLC polls
        stack.callback(rogue.close)
        time.sleep(0.2)
        plc.stop()                                                  # the PLC is gone ...
        with Rogue(rogue, "echo") as echo:                          # ... and a rogue echoes every heartbeat
            time.sleep(FAST["silence_alarm_s"] * 3)
            health = link.health()
    assert not health.connected
    assert any("PLC silent" in text for text in health.alarms)
    assert echo.accepted == 0 and echo.refused > 0


def test_only_the_allowed_address_writes_even_when_another_polls_first() -> None:
    port, events = free_port(), Events()
    config = {"type": "modbus-tcp", "port": port, "allow_clients": [OTHER_HOST], **FAST}
    with ExitStack() as stack:
        link = stack.enter_context(open_link(config, **events.callbacks()))
        early = stack.enter_context(_closing(client(port)))          # 127.0.0.1: not in allow_clients
        assert not early.read_holding_registers(0, count=29).isError()     # reading is open
        refused = early.write_register(Reg.HEARTBEAT_ECHO, 1)
        assert refused.isError() and refused.exception_code == 1
        plc = stack.enter_context(ModbusPlcSimulator.on_tcp("127.0.0.1", port, source_address=OTHER_HOST))
        assert link.send(1, "P-1", Verdict.REJECT, Reason.ANOMALY, time.monotonic() + 5.0).acked
        assert [v.seq for v in plc.received()] == [1]
    assert any("not an allowed client" in text for text in events.alarms)


def test_an_ack_ahead_of_the_published_seq_is_refused_even_from_the_plc() -> None:
    port, events = free_port(), Events()
    with ExitStack() as stack:
        link = stack.enter_context(open_link({"type": "modbus-tcp", "port": port, **FAST,
                                              "ack_timeout_s": 1.0}, epoch=0x00AB0001, **events.callbacks()))
        plc = stack.enter_context(_closing(client(port)))
        block = plc.read_holding_registers(0, count=29).registers            # the PLC polls: it is the PLC
        assert join32(block[Reg.EPOCH_HI], block[Reg.EPOCH_LO]) == 0x00AB0001
        ahead = plc.write_registers(Reg.ACK_SEQ_HI, [0, 5])                  # nothing published yet
        assert ahead.isError() and ahead.exception_code == 3
        assert not plc.write_registers(Reg.EPOCH_ACK_HI, [block[Reg.EPOCH_HI], block[Reg.EPOCH_LO]]).isError()
        sent = threading.Thread(target=link.send, args=(7, "P-7", Verdict.REJECT, Reason.ANOMALY,
                                                        time.monotonic() + 5.0))
        sent.start()
        until = time.monotonic() + 5.0
        while time.monotonic() < until and not plc.read_holding_registers(0, count=29).registers[Reg.NEW_VERDICT]:
            time.sleep(0.01)
        ahead = plc.write_registers(Reg.ACK_SEQ_HI, [0, 8])                  # SEQ 7 is published
        assert ahead.isError() and ahead.exception_code == 3
        assert not plc.write_registers(Reg.ACK_SEQ_HI, [0, 7]).isError()
        sent.join(5)
    assert events.acks == [(7, False)]
    assert any("ahead of the published SEQ" in text for text in events.alarms)


def test_the_heartbeat_is_a_new_nonce_every_beat() -> None:
    port = free_port()
    with ExitStack() as stack:
        stack.enter_context(open_link({"type": "modbus-tcp", "port": port, **FAST}))
        plc = stack.enter_context(ModbusPlcSimulator.on_tcp("127.0.0.1", port))
        assert plc.wait_for(lambda c: c.heartbeats >= 1, 5.0)      # it polled first: it is the PLC
        seen: list[tuple[int, int]] = []
        reader = stack.enter_context(_closing(client(port)))        # another client: reads only
        until = time.monotonic() + 10.0
        while time.monotonic() < until and len(seen) < 8:
            v = reader.read_holding_registers(0, count=29).registers
            if v[Reg.HEARTBEAT] and (not seen or seen[-1][0] != v[Reg.HEARTBEAT_COUNT]):
                seen.append((v[Reg.HEARTBEAT_COUNT], v[Reg.HEARTBEAT]))
            time.sleep(0.01)
        assert plc.counters().heartbeats >= 4
    nonces = [nonce for _, nonce in seen]
    assert len(seen) >= 4, seen
    assert all(a != b for a, b in zip(nonces, nonces[1:])), seen
    assert nonces != list(range(nonces[0], nonces[0] + len(nonces)))      # not a counter a rogue could predict


def test_allow_clients_must_be_addresses() -> None:
    with pytest.raises(ValueError, match="link.allow_clients"):
        parse_link_config({"type": "modbus-tcp", "allow_clients": ["plc.local"]})


def test_with_allow_clients_every_connection_of_the_plc_may_write() -> None:
    """A PLC whose read block and write block are separate client connections (common on PLCs)."""
    port, events = free_port(), Events()
    config = {"type": "modbus-tcp", "port": port, "allow_clients": ["127.0.0.1"], **FAST}
    with ExitStack() as stack:
        stack.enter_context(open_link(config, epoch=0x00010002, **events.callbacks()))
        reader = stack.enter_context(_closing(client(port)))
        writer = stack.enter_context(_closing(client(port)))
        block = reader.read_holding_registers(0, count=29).registers
        assert not writer.write_registers(Reg.EPOCH_ACK_HI, [block[Reg.EPOCH_HI], block[Reg.EPOCH_LO]]).isError()
    assert not any("refused" in text for text in events.alarms)


# --------------------------------------------------------------------------------- OPC UA

USERS = [{"username": "plc", "password": "s3cret"}, {"username": "hmi", "password": "look"}]


@pytest.fixture(scope="module")
def opcua_line(tmp_path_factory) -> Any:
    pytest.importorskip("asyncua")
    from musc_edge.edge.plc_sim.opcua import OpcUaPlcSimulator

    storage = tmp_path_factory.mktemp("storage")
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/musc-edge/"
    events = Events()
    config = {"type": "opcua", "endpoint": endpoint, "users": USERS, "plc_user": "plc", **FAST,
              "ack_timeout_s": 0.3}
    with open_link(config, storage_dir=storage, **events.callbacks()) as link:
        with OpcUaPlcSimulator(endpoint, "plc", "s3cret") as sim:
            assert sim.wait_for(lambda c: c.heartbeats >= 1, 30.0), f"PLC never logged in: {events.alarms}"
            yield link, sim, events, endpoint, storage


def _session(endpoint: str, user: str, password: str, body: Any) -> Any:
    from tests.test_opcua_link import encrypted_client

    async def run() -> Any:
        session = await encrypted_client(endpoint, user, password)
        await session.connect()
        try:
            idx = await session.get_namespace_index("urn:musc-edge:reject-link")
            return await body(session, lambda name: session.get_node(f"ns={idx};s=MuscEdge.{name}"))
        finally:
            await session.disconnect()

    return asyncio.run(run())


def test_opcua_offers_only_signed_and_encrypted_endpoints_with_a_kept_certificate(opcua_line) -> None:
    from asyncua import Client

    _, _, _, endpoint, storage = opcua_line

    async def endpoints() -> list[Any]:
        return await Client(endpoint, timeout=5).connect_and_get_server_endpoints()

    found = asyncio.run(endpoints())
    assert {(e.SecurityPolicyUri.rsplit("#", 1)[-1], e.SecurityMode.name) for e in found} == \
        {("Basic256Sha256", "SignAndEncrypt")}                     # before: None/None, password in clear
    key = storage / "opcua" / "server-key.pem"
    assert (storage / "opcua" / "server-certificate.der").is_file() and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_opcua_only_the_plc_login_writes_the_acknowledgements(opcua_line) -> None:
    from asyncua import ua
    from asyncua.ua.uaerrors import UaError

    link, _, events, endpoint, _ = opcua_line

    async def write_ack(session: Any, node: Any) -> None:
        sequence = await node("Sequence").read_value()
        await node("AckSeq").write_value(ua.DataValue(ua.Variant(sequence + 1, ua.VariantType.UInt32)))

    with pytest.raises(UaError):
        _session(endpoint, "hmi", "look", write_ack)              # a logged-in HMI may read, never write
    assert any("login 'hmi'" in text and "refused" in text for text in link.health().alarms)
    with pytest.raises(UaError):
        _session(endpoint, "plc", "s3cret", write_ack)             # a second session of the PLC's login
    assert any("another session" in text and "refused" in text for text in link.health().alarms)
    assert any("foreign" not in text and "refused" in text for text in events.alarms)    # raised once, updated


def test_opcua_a_forged_ack_ahead_of_sequence_acknowledges_nothing(opcua_line) -> None:
    """Row 6: before, 11/12 verdicts were acked in the ledger and never seen by the PLC. A second session cannot
    write at all (above); an AckSeq ahead of Sequence, whoever writes it, reaches the register image as a refusal."""
    link, sim, events, _, _ = opcua_line
    transport = link._transport
    before = len(events.acks)
    for seq in range(1, 6):
        assert link.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, time.monotonic() + 10.0).acked
        with pytest.raises(ValueError, match="ahead"):
            transport.image.plc_write(Reg.ACK_SEQ_HI, split32(seq + 1))          # what a forger writes
    assert [seq for seq, _ in events.acks[before:]] == [1, 2, 3, 4, 5]
    assert {v.seq for v in sim.received()} >= {1, 2, 3, 4, 5}


def test_opcua_config_names_the_plc_user() -> None:
    with pytest.raises(ValueError, match="plc_user"):
        parse_link_config({"type": "opcua", "users": USERS})


class _closing:
    """Close a Modbus client at the end of a ``with``."""

    def __init__(self, target: ModbusTcpClient) -> None:
        self.target = target

    def __enter__(self) -> ModbusTcpClient:
        return self.target

    def __exit__(self, *exc: object) -> None:
        self.target.close()


def test_opcua_a_reconnecting_plc_writes_again_and_the_certificate_is_kept(tmp_path) -> None:
    pytest.importorskip("asyncua")
    from musc_edge.edge.plc_sim.opcua import OpcUaPlcSimulator

    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/musc-edge/"
    config = {"type": "opcua", "endpoint": endpoint, "users": USERS[:1], **FAST, "ack_timeout_s": 0.3}
    certificate = tmp_path / "opcua" / "server-certificate.der"
    with open_link(config, storage_dir=tmp_path) as link:
        first = certificate.read_bytes()
        for seq in (1, 2):                                   # the PLC's session ends, a new one starts
            with OpcUaPlcSimulator(endpoint, "plc", "s3cret") as sim:
                assert link.send(seq, f"P-{seq}", Verdict.REJECT, Reason.ANOMALY, time.monotonic() + 30.0).acked
                assert [v.seq for v in sim.received()] == [seq]
        assert not any("refused" in text for text in link.health().alarms)
    with open_link(config, storage_dir=tmp_path):
        assert certificate.read_bytes() == first               # generated once, kept: the PLC's trust stays valid


# --------------------------------------------------------------------------------- property: the register image

def test_no_sequence_of_plc_writes_acknowledges_anything_but_the_published_value() -> None:
    """Any writes a peer makes to its registers 20..31 (or beyond): a verdict counts as acknowledged only after
    ACK_SEQ was written equal to the published SEQ, under the acknowledged epoch; the heartbeat only after the
    current nonce was echoed; nothing ahead of SEQ is ever stored."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from musc_edge.edge.links.register_map import PublishedVerdict, RegisterImage, WriteRefused, new_nonce

    word = st.integers(0, 0xFFFF)
    write = st.tuples(st.integers(15, 34), st.lists(word, min_size=1, max_size=4))
    step = st.one_of(write, st.just(("publish",)), st.just(("beat",)))

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(st.lists(step, max_size=40), st.integers(1, 0xFFFFFFFF), st.integers(0, 0xFFFFFFF0))
    def run(steps: list[tuple], epoch: int, first_seq: int) -> None:
        image, seq, nonce = RegisterImage(), first_seq, 0
        image.update({Reg.EPOCH_HI: split32(epoch)[0], Reg.EPOCH_LO: split32(epoch)[1]})
        published = False
        epoch_written = ack_written = echo_written = False
        for item in steps:
            if item[0] == "publish":
                seq += 1
                image.publish(PublishedVerdict(seq, 2, 1, 0, f"P-{seq}", 0, epoch))
                published, ack_written = True, False
            elif item[0] == "beat":
                nonce = new_nonce(nonce)
                image.update({Reg.HEARTBEAT: nonce})
                echo_written = False
            else:
                address, values = item
                try:
                    image.plc_write(address, values)
                except WriteRefused:
                    continue
                v = image.snapshot()
                touched = range(address, address + len(values))
                if Reg.EPOCH_ACK_HI in touched or Reg.EPOCH_ACK_LO in touched:
                    epoch_written = epoch_written or join32(v[Reg.EPOCH_ACK_HI], v[Reg.EPOCH_ACK_LO]) == epoch
                if (Reg.ACK_SEQ_HI in touched or Reg.ACK_SEQ_LO in touched) and published and epoch_written:
                    ack_written = ack_written or join32(v[Reg.ACK_SEQ_HI], v[Reg.ACK_SEQ_LO]) == seq
                if Reg.HEARTBEAT_ECHO in touched and nonce:
                    echo_written = echo_written or v[Reg.HEARTBEAT_ECHO] == nonce
            events = image.events
            assert (events.acked_seq == seq) == (published and ack_written), (events, seq)
            assert events.acked_seq in (None, seq)
            assert (events.echoed == nonce and nonce != 0) == echo_written
            if published:
                ack = join32(*image.snapshot()[Reg.ACK_SEQ_HI:Reg.ACK_SEQ_LO + 1])
                assert ack == seq or not (0 < (ack - seq) % 2**32 < 2**31)      # never ahead of SEQ

    run()


def test_a_flood_of_refused_requests_logs_one_line_per_message_and_interval() -> None:
    """asyncua logs every refused request at ERROR (629 lines in t09's 6 s of forged writes); once per interval."""
    import logging

    from musc_edge.edge.links.library_logs import RepeatFilter

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.texts: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.texts.append(record.getMessage())

    logger, collect = logging.getLogger("tests.flood"), Collect()
    logger.addHandler(collect)
    logger.propagate = False
    repeats = RepeatFilter(interval_s=0.2)
    logger.addFilter(repeats)
    try:
        for _ in range(500):
            logger.error("sending service fault response: %s", "BadUserAccessDenied")
        logger.error("another message")
        time.sleep(0.25)
        logger.error("sending service fault response: %s", "BadUserAccessDenied")
    finally:
        logger.removeFilter(repeats)
        logger.removeHandler(collect)
    assert collect.texts == ["sending service fault response: BadUserAccessDenied", "another message",
                             "sending service fault response: BadUserAccessDenied (499 more like it held back)"]
