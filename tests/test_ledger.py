"""The results ledger: durability, sequence numbers, acks, counters, concurrent readers, migrations."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from musc_edge.edge.ledger import MIGRATIONS, SCHEMA_VERSION, Ledger, LedgerError, apply_migrations
from musc_edge.edge.record import PartRecord, Reason, StageTimes, Verdict

HASHES = dict(model_hash="model-sha", config_hash="config-sha", calibration_version="cal-3")


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_part(part_id: str, verdict: Verdict = Verdict.ACCEPT, reason: Reason = Reason.OK,
              signalled: Verdict | None = None, total: float = 0.01, test_part: bool = False) -> PartRecord:
    part = PartRecord(part_id, "recipe-a", capture_time=1_700_000_000.0, encoder=np.int64(42), test_part=test_part)
    part.decide(verdict, reason, detail=f"detail of {part_id}")
    part.signalled = signalled or (Verdict.REJECT if verdict is Verdict.NO_VERDICT else verdict)
    part.raw_score, part.score, part.threshold = 1.5, np.float32(0.75), 0.9   # numpy scalars, as scoring returns
    part.times = StageTimes(decode=0.001, features=0.002, scoring=0.003, total=total)
    return part


def test_row_round_trips_every_field(tmp_path: Path) -> None:
    part = make_part("p-1", Verdict.NO_VERDICT, Reason.DEADLINE, signalled=Verdict.ACCEPT, test_part=True)
    part.source_ref = "/frames/p-1.png"
    with Ledger(tmp_path / "ledger.db", clock=FakeClock(123.0)) as ledger:
        seq = ledger.reserve(part, **HASHES)
        row = ledger.get(seq)
    assert part.seq == seq == row.seq
    assert (row.part_id, row.recipe, row.capture_time, row.encoder, row.source_ref) == (
        "p-1", "recipe-a", 1_700_000_000.0, 42, "/frames/p-1.png")
    assert (row.verdict, row.reason, row.reason_label, row.signalled) == (
        Verdict.NO_VERDICT, Reason.DEADLINE, "deadline", Verdict.ACCEPT)
    assert (row.raw_score, row.score, row.threshold, row.detail) == (1.5, 0.75, 0.9, "detail of p-1")
    assert (row.decode_s, row.features_s, row.scoring_s, row.link_s, row.total_s) == (0.001, 0.002, 0.003, None, 0.01)
    assert (row.model_hash, row.config_hash, row.calibration_version) == ("model-sha", "config-sha", "cal-3")
    assert row.test_part and row.created == 123.0
    assert (row.acked, row.acked_time, row.ack_late) == (False, None, False)


def test_storage_is_wal_with_full_sync(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as ledger:
        assert ledger.pragmas() == {"journal_mode": "wal", "synchronous": 2, "user_version": SCHEMA_VERSION}


_KILLED_WRITER = """
import sys, time
from musc_edge.edge.ledger import Ledger
from musc_edge.edge.record import PartRecord, Reason, Verdict
ledger = Ledger(sys.argv[1])
i = 0
while True:
    part = PartRecord(f"part-{i}", "recipe", time.time()).decide(Verdict.REJECT, Reason.ANOMALY)
    part.signalled = Verdict.REJECT
    seq = ledger.reserve(part, model_hash="m", config_hash="c", calibration_version="1")
    print(seq, part.part_id, flush=True)
    i += 1
"""


@pytest.mark.timeout(60)
def test_reported_rows_survive_sigkill_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    reported = []
    with subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE,
                          text=True) as writer:
        for line in writer.stdout:
            reported.append(line.split())
            if len(reported) == 200:
                os.kill(writer.pid, signal.SIGKILL)   # lands while the writer is in its next insert
                break
        reported += [line.split() for line in writer.stdout if line.endswith("\n")]
    assert writer.returncode == -signal.SIGKILL
    assert len(reported) >= 200

    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    with Ledger(path) as ledger:
        for seq, part_id in reported:
            row = ledger.get(int(seq))
            assert row is not None and row.part_id == part_id, f"reported seq {seq} lost after SIGKILL"
        next_seq = ledger.reserve(make_part("after-restart"), **HASHES)
    assert next_seq > max(int(seq) for seq, _ in reported)


def test_seq_is_monotonic_and_never_reused_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    seqs = []
    for session in range(3):
        with Ledger(path) as ledger:
            seqs += [ledger.reserve(make_part(f"s{session}-{i}"), **HASHES) for i in range(4)]
    assert seqs == sorted(set(seqs)) and len(seqs) == 12
    with Ledger.open_readonly(path) as reader:
        assert reader.count() == 12
        assert [r.seq for r in reader.iter_rows(chunk=5)] == seqs
        assert [r.seq for r in reader.iter_rows(since_seq=seqs[7], chunk=3)] == seqs[8:]
        assert [r.seq for r in reader.recent(3)] == seqs[:-4:-1]
        assert [r.part_id for r in reader.find_part("s1-2")] == ["s1-2"]


def test_unacked_and_mark_acked_persist(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        a, b, c = (ledger.reserve(make_part(name), **HASHES) for name in "abc")
        ledger.mark_acked(b, late=True, when=50.0)
        ledger.mark_acked(b, late=False, when=60.0)   # a re-delivered duplicate keeps the first ack
        ledger.update_link_time(b, 0.004, total=0.02)
        with pytest.raises(KeyError, match="seq 999"):
            ledger.mark_acked(999, late=False, when=1.0)
        with pytest.raises(KeyError, match="seq 999"):
            ledger.update_link_time(999, 0.1)
    with Ledger(path) as ledger:
        assert [r.seq for r in ledger.unacked()] == [a, c]
        row = ledger.get(b)
        assert (row.acked, row.acked_time, row.ack_late, row.link_s, row.total_s) == (True, 50.0, True, 0.004, 0.02)
        ledger.mark_acked(a, late=False, when=70.0)
        assert [r.seq for r in ledger.unacked()] == [c]


def test_rows_are_append_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        seq = ledger.reserve(make_part("p", Verdict.REJECT, Reason.ANOMALY), **HASHES)
    raw = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("UPDATE parts SET verdict = 'ACCEPT' WHERE seq = ?", (seq,))
    with pytest.raises(sqlite3.DatabaseError, match="never deleted"):
        raw.execute("DELETE FROM parts")
    raw.close()


# verdict, reason, signalled, test_part, created, acked, late
COUNTER_ROWS = [
    (Verdict.ACCEPT, Reason.OK, None, False, 100.0, True, False),
    (Verdict.ACCEPT, Reason.OK, None, False, 101.0, True, True),
    (Verdict.REJECT, Reason.ANOMALY, None, False, 102.0, True, False),
    (Verdict.NO_VERDICT, Reason.WARMUP, Verdict.REJECT, False, 103.0, False, False),
    (Verdict.NO_VERDICT, Reason.DEADLINE, Verdict.ACCEPT, False, 104.0, True, False),
    (Verdict.REJECT, Reason.TEST_FIRE, None, True, 105.0, True, True),
    (Verdict.NO_VERDICT, Reason.DECODE_ERROR, Verdict.REJECT, False, 106.0, False, False),
]


@pytest.mark.parametrize("since, expected", [
    (None, dict(parts=7, ok=2, ng=2, no_verdict=3, passed_flagged=1, test_parts=1, acked=5, unacked=2, ack_late=2,
                no_verdict_by_reason={"warmup": 1, "deadline": 1, "decode_error": 1})),
    (103.0, dict(parts=4, ok=0, ng=1, no_verdict=3, passed_flagged=1, test_parts=1, acked=2, unacked=2, ack_late=1,
                 no_verdict_by_reason={"warmup": 1, "deadline": 1, "decode_error": 1})),
    (104.5, dict(parts=2, ok=0, ng=1, no_verdict=1, passed_flagged=0, test_parts=1, acked=1, unacked=1, ack_late=1,
                 no_verdict_by_reason={"decode_error": 1})),
    (200.0, dict(parts=0, ok=0, ng=0, no_verdict=0, passed_flagged=0, test_parts=0, acked=0, unacked=0, ack_late=0,
                 no_verdict_by_reason={})),
])
def test_counters_on_known_rows(tmp_path: Path, since: float | None, expected: dict) -> None:
    clock = FakeClock()
    with Ledger(tmp_path / "ledger.db", clock=clock) as ledger:
        for i, (verdict, reason, signalled, test_part, created, acked, late) in enumerate(COUNTER_ROWS):
            clock.now = created
            seq = ledger.reserve(make_part(f"p{i}", verdict, reason, signalled, test_part=test_part), **HASHES)
            if acked:
                ledger.mark_acked(seq, late=late, when=created + 0.01)
        counters = ledger.counters(since)
    assert {key: counters[key] for key in expected} == expected
    assert counters["latency"]["total"]["n"] == expected["parts"]


def test_latency_statistics(tmp_path: Path) -> None:
    totals_ms = np.random.default_rng(0).permutation(np.arange(1, 102))   # 1..101 ms, shuffled
    with Ledger(tmp_path / "ledger.db") as ledger:
        seqs = [ledger.reserve(make_part(f"p{ms}", total=ms / 1000), **HASHES) for ms in totals_ms]
        for seq, link in zip(seqs[:3], (0.002, 0.006, 0.004)):
            ledger.update_link_time(seq, link)
        latency = ledger.counters()["latency"]
    # 101 sorted values: the median is the 51st, p99 sits exactly on the 100th (0.99 * 100 = 99, 0-based)
    assert latency["total"] == pytest.approx({"n": 101, "min": 0.001, "median": 0.051, "p99": 0.100, "max": 0.101})
    assert latency["link"] == pytest.approx({"n": 3, "min": 0.002, "median": 0.004, "p99": 0.00596, "max": 0.006})
    assert latency["decode"]["median"] == pytest.approx(0.001)
    with Ledger(tmp_path / "empty.db") as empty_ledger:
        empty = empty_ledger.counters()["latency"]["scoring"]
    assert empty == {"n": 0, "min": None, "median": None, "p99": None, "max": None}


def _reference_counts(rows: list, since: float | None) -> dict:
    """Counters recomputed row by row from the persisted rows (independent of the cached path)."""
    kept = [r for r in rows if since is None or r.created >= since]
    return {"parts": len(kept),
            "ok": sum(r.verdict is Verdict.ACCEPT for r in kept),
            "ng": sum(r.verdict is Verdict.REJECT for r in kept),
            "no_verdict": sum(r.verdict is Verdict.NO_VERDICT for r in kept),
            "acked": sum(r.acked for r in kept),
            "ack_late": sum(r.ack_late for r in kept),
            "link_n": sum(r.link_s is not None for r in kept),
            "total_max": max((r.total_s for r in kept), default=None)}


def _summary(counters: dict) -> dict:
    keys = ("parts", "ok", "ng", "no_verdict", "acked", "ack_late")
    return {**{k: counters[k] for k in keys}, "link_n": counters["latency"]["link"]["n"],
            "total_max": counters["latency"]["total"]["max"]}


def test_incremental_counters_follow_inserts_acks_and_window_changes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    clock = FakeClock(0.0)
    verdicts = list(Verdict)
    with Ledger(tmp_path / "ledger.db", clock=clock) as ledger:
        windows = [None, 30.0, 80.0, 10.0, None, 150.0, 30.0]
        for step, since in enumerate(windows):
            for _ in range(int(rng.integers(5, 60))):      # more rows than the cache's first allocation overall
                clock.now += float(rng.uniform(0.0, 2.0))
                verdict = verdicts[int(rng.integers(3))]
                reason = {Verdict.ACCEPT: Reason.OK, Verdict.REJECT: Reason.ANOMALY}.get(verdict, Reason.OVERLOAD)
                ledger.reserve(make_part(f"s{step}", verdict, reason, total=float(rng.uniform(0.01, 0.2))), **HASHES)
            for row in ledger.unacked():
                if rng.random() < 0.5:   # acks and link times arrive separately, each must be seen
                    ledger.mark_acked(row.seq, late=bool(rng.random() < 0.2), when=clock.now)
                if rng.random() < 0.3:
                    ledger.update_link_time(row.seq, 0.003, total=float(rng.uniform(0.2, 0.3)))
            rows = list(ledger.iter_rows())
            assert _summary(ledger.counters(since)) == _reference_counts(rows, since), f"window since={since}"


@pytest.mark.timeout(60)
def test_readonly_reader_in_parallel_with_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    reader = Ledger.open_readonly(path)
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with Ledger(path) as ledger:
                for i in range(300):
                    seq = ledger.reserve(make_part(f"w{i}"), **HASHES)
                    ledger.mark_acked(seq, late=False, when=float(i))
        except BaseException as exc:   # reported to the main thread
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    while not done.is_set():
        counters = reader.counters()
        assert counters["acked"] <= counters["parts"]
        seen.append(counters["parts"])
    writer.join()
    assert not errors
    assert seen == sorted(seen)
    assert reader.count() == 300 and reader.counters()["acked"] == 300 and reader.unacked() == []
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._conn.execute("DELETE FROM parts")
    reader.close()


def test_bad_input_is_refused_with_names(tmp_path: Path) -> None:
    part = make_part("no-signal")
    part.signalled = None
    with Ledger(tmp_path / "ledger.db") as ledger, pytest.raises(ValueError, match="'no-signal'.*signalled"):
        ledger.reserve(part, **HASHES)
    garbage = tmp_path / "not-a-db.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not-a-db.db"):
        Ledger(garbage)
    with pytest.raises(LedgerError, match="missing.db"):
        Ledger.open_readonly(tmp_path / "missing.db")


def test_migration_hook_upgrades_and_refuses_newer_schemas(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as ledger:
        ledger.reserve(make_part("old"), **HASHES)

    def add_station(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE parts ADD COLUMN station TEXT NOT NULL DEFAULT 'line-1'")

    conn = sqlite3.connect(path, isolation_level=None)
    assert apply_migrations(conn, (*MIGRATIONS, add_station)) == SCHEMA_VERSION + 1
    assert conn.execute("SELECT part_id, station FROM parts").fetchall() == [("old", "line-1")]
    conn.close()
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        Ledger(path)
    with pytest.raises(LedgerError, match="ledger.db: schema version"):
        Ledger.open_readonly(path)
