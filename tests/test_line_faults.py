"""Issue 21, item 1: nothing ends the line but a stop request or a fault it must stop for, and nothing ends it
quietly. An exception raised inside each of the line's threads (source, prefetch, worker, output/link, pool
writer, status, telemetry) becomes that part's NO_VERDICT row or an alarm and the line goes on; a fault it
cannot survive ends ``run()`` with ``LineStopped`` naming it (``musc-edge run`` exits non-zero).

The faults are injected into real parts of the line (a scripted frame source, the real ZeroMQ reject link to
the PLC simulator on 127.0.0.1, the real inspector with a tiny model)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from musc_edge.edge.config import parse_config
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime import output as output_stage
from musc_edge.edge.runtime import prefetch as prefetch_stage
from musc_edge.edge.runtime.inspector import Inspector
from musc_edge.edge.runtime.line import Line, LineStopped
from musc_edge.edge.sources.base import FrameSource, SourceConfig, SourceError

from .test_runtime import make_parts, raw_config

pytestmark = pytest.mark.timeout(120)


class ScriptedSource(FrameSource):
    """A live camera on a script: a file gives its part, an exception is raised where it stands. A fresh
    ``parts()`` goes on where the last one stopped (frames already received are not received again); after the
    script it waits for ``close()``, like a camera with no more triggers. The first ``open_failures`` opens fail."""

    def __init__(self, script: list, open_failures: int = 0, interval_s: float = 0.05) -> None:
        super().__init__(SourceConfig())
        self._script = iter(script)
        self.open_failures, self.opens, self.interval_s = open_failures, 0, interval_s
        self.delivered = 0
        self.exhausted = threading.Event()

    def _acquire(self) -> None:
        self.opens += 1
        if self.opens <= self.open_failures:
            raise SourceError("camera 'cam0' not found")

    def _iterate(self):
        for item in self._script:
            if isinstance(item, BaseException):
                raise item
            if self._stop.wait(self.interval_s):
                return
            self.delivered += 1
            yield PartRecord(part_id=f"scripted{self.delivered:03d}", recipe="default", capture_time=time.time(),
                             raw=Path(item).read_bytes(), source_ref=str(item))
        self.exhausted.set()
        self._stop.wait()


def stop_when_recorded(line: Line, source: ScriptedSource, rows: int, timeout_s: float = 60.0) -> threading.Thread:
    """A thread that stops ``line`` once its source is exhausted and ``rows`` parts are recorded."""
    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        source.exhausted.wait(timeout_s)
        while line.stats.parts < rows and time.monotonic() < deadline:
            time.sleep(0.05)
        line.stop()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def plc():
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as simulator:
        yield simulator


@pytest.fixture
def files(tmp_path) -> list[Path]:
    return sorted(make_parts(tmp_path / "parts", 8).glob("*/*.png"))


def line_raw(toy_model, tmp_path, plc) -> dict:
    raw = raw_config(toy_model, tmp_path / "parts" / "test", tmp_path / "line",
                     {"type": "zmq", "endpoint": plc.address})
    raw["source"]["rate"] = 20.0
    return raw


def line_config(toy_model, tmp_path, plc):
    return parse_config(line_raw(toy_model, tmp_path, plc))


def run_scripted(config, script, **source) -> tuple[Line, ScriptedSource, list]:
    scripted = ScriptedSource(script, **source)
    line = Line(config, source=scripted)
    n_parts = sum(not isinstance(item, BaseException) for item in script)
    n_faults = sum(isinstance(item, BaseException) and not isinstance(item, SourceError) for item in script)
    watcher = stop_when_recorded(line, scripted, n_parts + n_faults)
    line.run()
    watcher.join(5)
    return line, scripted, line.ledger_rows()


def assert_one_acked_row_per_part(rows, n: int) -> None:
    assert len(rows) == n
    assert len({r.part_id for r in rows}) == n
    assert all(r.acked for r in rows), [r.part_id for r in rows if not r.acked]


# -- source thread --------------------------------------------------------------------------------------------
def test_a_source_that_raises_on_a_frame_gives_it_a_no_verdict_row_and_is_read_on(toy_model, tmp_path, plc, files):
    """Issue 21 rows 1 and 2: an OverflowError (a shape product that wraps) and a RecursionError (a deeply nested
    header) escaping the source used to end the line with exit 0 and no row for that frame."""
    script = [*files[:3], OverflowError("cannot fit 'int' into an index-sized integer"), *files[3:6],
              RecursionError("maximum recursion depth exceeded while decoding a JSON array"), *files[6:]]
    line, source, rows = run_scripted(line_config(toy_model, tmp_path, plc), script)
    assert_one_acked_row_per_part(rows, len(files) + 2)
    faults = [r for r in rows if r.part_id.startswith("SOURCE-FAULT-")]
    assert [r.detail.split(":")[1].strip() for r in faults] == ["OverflowError", "RecursionError"]
    assert all(r.verdict == Verdict.NO_VERDICT and r.reason == Reason.DECODE_ERROR and
               r.signalled == Verdict.REJECT for r in faults)
    assert source.opens == 1, "a frame fault resumes the open source (frames queued in it are kept)"
    assert line.ended == "stop requested"


def test_a_failing_source_device_is_reopened_and_the_line_goes_on(toy_model, tmp_path, plc, files):
    script = [*files[:4], SourceError("camera 'cam0' unplugged"), *files[4:]]
    line, source, rows = run_scripted(line_config(toy_model, tmp_path, plc), script, open_failures=0)
    assert_one_acked_row_per_part(rows, len(files))   # a device fault concerns no frame: no extra row
    assert source.opens == 2
    assert any("frame source failed, reopening: camera 'cam0' unplugged" in a for a in line.stats.alarms)


def test_a_source_that_cannot_be_opened_at_all_stops_the_line_naming_it(toy_model, tmp_path, plc, files):
    source = ScriptedSource(files, open_failures=10**6)
    line = Line(line_config(toy_model, tmp_path, plc), source=source)
    line.source_give_up_s = 0.5
    with pytest.raises(LineStopped, match=r"frame source ScriptedSource could not be read for \d+ s: "
                                          r"camera 'cam0' not found"):
        line.run()
    assert source.opens >= 2, "it was retried before giving up"
    assert line.ledger_rows() == []


def test_a_source_whose_open_raises_is_retried_without_inventing_rows(toy_model, tmp_path, plc, files):
    class FlakyOpen(ScriptedSource):
        def _acquire(self) -> None:
            self.opens += 1
            if self.opens <= 2:
                raise OSError(19, "No such device")   # not a SourceError: a driver's own exception

    source = FlakyOpen(files)
    line = Line(line_config(toy_model, tmp_path, plc), source=source)
    watcher = stop_when_recorded(line, source, len(files))
    line.run()
    watcher.join(5)
    assert source.opens == 3
    assert_one_acked_row_per_part(line.ledger_rows(), len(files))   # no row for a failed open


def test_a_replay_of_a_missing_folder_stops_the_line_instead_of_ending_it(toy_model, tmp_path, plc):
    raw = line_raw(toy_model, tmp_path, plc)
    raw["source"]["path"] = str(tmp_path / "nonexistent")
    with pytest.raises(LineStopped, match="nonexistent.*does not exist"):
        Line(parse_config(raw)).run()


def test_a_finished_replay_says_so(toy_model, tmp_path, plc, files):
    line = Line(line_config(toy_model, tmp_path, plc))
    line.run()
    assert line.ended == f"replay of {tmp_path / 'parts' / 'test'} finished after {len(files)} parts"


def test_a_part_whose_deadline_cannot_be_computed_is_that_parts_no_verdict(toy_model, tmp_path, plc, files):
    """Issue 21 rows 9 and 10: a deadline or reject timing of inf made the first part raise OverflowError and
    the line exit 1 (the settings are now refused where they enter; the line survives them anyway)."""
    line = Line(line_config(toy_model, tmp_path, plc), source=ScriptedSource(files))
    deadline, stamped = line._clock.deadline, []

    def overflowing(capture_monotonic, encoder):
        stamped.append(1)
        if len(stamped) == 3:
            raise OverflowError("cannot convert float infinity to integer")
        return deadline(capture_monotonic, encoder)

    line._clock.deadline = overflowing
    watcher = stop_when_recorded(line, line.source, len(files))
    line.run()
    watcher.join(5)
    rows = line.ledger_rows()
    assert_one_acked_row_per_part(rows, len(files))
    failed = [r for r in rows if r.reason == Reason.ENGINE_ERROR]
    assert [r.part_id for r in failed] == ["scripted003"] and "cannot convert float infinity" in failed[0].detail


# -- prefetch and worker threads ------------------------------------------------------------------------------
def test_a_fault_handing_a_part_to_the_extract_threads_is_that_parts_no_verdict(toy_model, tmp_path, plc, files,
                                                                               monkeypatch):
    calls = []

    class FaultyExecutor(prefetch_stage.ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            calls.append(args[0].part_id)
            if len(calls) == 3:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(prefetch_stage, "ThreadPoolExecutor", FaultyExecutor)
    _, _, rows = run_scripted(line_config(toy_model, tmp_path, plc), files)
    assert_one_acked_row_per_part(rows, len(files))
    failed = [r for r in rows if r.reason == Reason.ENGINE_ERROR]
    assert [r.part_id for r in failed] == [calls[2]] and "cannot schedule new futures" in failed[0].detail


def test_a_fault_in_scoring_or_admission_costs_one_part_not_the_line(toy_model, tmp_path, plc, files, monkeypatch):
    inspect, admit, scored, admitted = Inspector.inspect, Inspector.admit, [], []

    def faulty_inspect(self, part, extracted=None, look_ahead=()):
        scored.append(part.part_id)
        if len(scored) == 2:
            raise FloatingPointError("overflow in the pool's distance matrix")
        return inspect(self, part, extracted, look_ahead)

    def faulty_admit(self, part, prepared, now=None):
        admitted.append(part.part_id)
        if len(admitted) == 5:
            raise MemoryError("pool buffer")
        return admit(self, part, prepared, now)

    monkeypatch.setattr(Inspector, "inspect", faulty_inspect)
    monkeypatch.setattr(Inspector, "admit", faulty_admit)
    line, _, rows = run_scripted(line_config(toy_model, tmp_path, plc), files)
    assert_one_acked_row_per_part(rows, len(files))
    by_id = {r.part_id: r for r in rows}
    assert by_id[scored[1]].reason == Reason.ENGINE_ERROR and "distance matrix" in by_id[scored[1]].detail
    assert by_id[admitted[4]].reason != Reason.ENGINE_ERROR, "an admission fault leaves the verdict standing"
    assert any(f"pool admission failed for part {admitted[4]}" in a for a in line.stats.alarms)


def test_a_worker_thread_fault_between_parts_is_alarmed_and_the_thread_restarted(toy_model, tmp_path, plc, files):
    config = line_config(toy_model, tmp_path, plc)
    source = ScriptedSource(files)
    line = Line(config, source=source)
    pings = []

    def watchdog() -> None:   # the worker pings it before every part and every idle poll
        pings.append(1)
        if len(pings) == 4:
            raise OSError("notify socket gone")

    line.systemd.watchdog = watchdog
    watcher = stop_when_recorded(line, source, len(files))
    line.run()
    watcher.join(5)
    assert_one_acked_row_per_part(line.ledger_rows(), len(files))
    assert any("worker thread fault, restarted: OSError: notify socket gone" in a for a in line.stats.alarms)


def test_a_worker_thread_that_keeps_faulting_stops_the_line_naming_it(toy_model, tmp_path, plc, files):
    line = Line(line_config(toy_model, tmp_path, plc), source=ScriptedSource(files))

    def watchdog() -> None:
        raise OSError("notify socket gone")

    line.systemd.watchdog = watchdog
    with pytest.raises(LineStopped, match=r"the worker thread failed 10 times within 60 s, last: OSError: "
                                          r"notify socket gone"):
        line.run()
    rows = line.ledger_rows()   # what the source delivered before the stop: each its NO_VERDICT row
    assert len(rows) == line.source.delivered and all(
        r.verdict == Verdict.NO_VERDICT and r.reason in (Reason.ENGINE_ERROR, Reason.OVERLOAD) for r in rows)
    assert any("the worker thread stopped" in r.detail for r in rows)


# -- output thread: link, telemetry ---------------------------------------------------------------------------
def test_a_link_that_raises_for_one_part_keeps_its_row_and_the_line_goes_on(toy_model, tmp_path, plc, files,
                                                                         monkeypatch):
    real_open, sent = output_stage.open_link, []

    def open_faulty_link(*args, **kwargs):
        link = real_open(*args, **kwargs)
        send = link.send

        def faulty_send(seq, part_id, *rest, **kw):
            sent.append(part_id)
            if len(sent) == 3:
                raise RuntimeError("link transport fault")
            return send(seq, part_id, *rest, **kw)
        link.send = faulty_send
        return link

    monkeypatch.setattr(output_stage, "open_link", open_faulty_link)
    line, _, rows = run_scripted(line_config(toy_model, tmp_path, plc), files)
    assert len(rows) == len(files) and len({r.part_id for r in rows}) == len(files)
    assert [r.part_id for r in rows if not r.acked] == [sent[2]], "only the part whose send raised is unacked"
    assert any(f"(part {sent[2]!r}) not sent: RuntimeError: link transport fault" in a for a in line.stats.alarms)
    assert line.stats.parts == len(files) and line.stats.send_failures == 1


def test_a_part_the_output_stage_fails_on_before_its_row_is_recorded_no_verdict(toy_model, tmp_path, plc, files,
                                                                                monkeypatch):
    check, checked = output_stage.check_part_fields, []

    def faulty_check(part, **kwargs):
        if not kwargs:   # the output stage's check (the source's passes default_recipe)
            checked.append(part.part_id)
            if len(checked) == 2:
                raise KeyError("a field the checks did not foresee")
        return check(part, **kwargs)

    monkeypatch.setattr(output_stage, "check_part_fields", faulty_check)
    _, _, rows = run_scripted(line_config(toy_model, tmp_path, plc), files)
    assert_one_acked_row_per_part(rows, len(files))
    failed = [r for r in rows if r.part_id == checked[1]]
    assert failed[0].verdict == Verdict.NO_VERDICT and "output stage failed" in failed[0].detail


class RaisingExporter:
    """A telemetry sink whose every call raises (a broker library bug, a closed socket)."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise ConnectionResetError(f"telemetry sink {name} failed")
        return fail


def test_a_telemetry_sink_that_raises_never_reaches_the_line(toy_model, tmp_path, plc, files):
    line = Line(line_config(toy_model, tmp_path, plc), source=ScriptedSource(files))
    line.telemetry.prometheus = line.telemetry.mqtt = RaisingExporter()
    watcher = stop_when_recorded(line, line.source, len(files))
    line.run()
    watcher.join(5)
    assert_one_acked_row_per_part(line.ledger_rows(), len(files))


# -- pool writer and status threads ---------------------------------------------------------------------------
def test_a_pool_writer_fault_is_alarmed_and_shutdown_still_completes(toy_model, tmp_path, plc, files, monkeypatch):
    def faulty_write(self, snapshot):
        raise ValueError("pool state has an unexpected key")

    monkeypatch.setattr(Inspector, "write_pools", faulty_write)
    line, _, rows = run_scripted(line_config(toy_model, tmp_path, plc), files)
    assert_one_acked_row_per_part(rows, len(files))
    assert any("pool could not be saved: pool state has an unexpected key" in a for a in line.stats.alarms)


def test_a_status_display_that_raises_does_not_stop_the_line(toy_model, tmp_path, plc, files):
    shown = []

    def broken_display(text: str) -> None:
        shown.append(text)
        raise BrokenPipeError("stderr closed")

    source = ScriptedSource(files)
    line = Line(line_config(toy_model, tmp_path, plc), source=source, status=broken_display, status_every_s=0.05)
    watcher = stop_when_recorded(line, source, len(files))
    line.run()
    watcher.join(5)
    assert_one_acked_row_per_part(line.ledger_rows(), len(files))
    assert len(shown) >= 2, "the status thread went on after the display raised"


def test_the_mqtt_telemetry_thread_survives_an_outbox_fault(tmp_path):
    """The publisher thread used to die silently when the outbox could not be written (events then piled up
    in memory for the rest of the run); now it logs the fault and goes on storing."""
    from musc_edge.edge.telemetry import MqttSettings
    from musc_edge.edge.telemetry.local_broker import free_port
    from musc_edge.edge.telemetry.mqtt import MqttPublisher

    publisher = MqttPublisher(MqttSettings(enabled=True, host="127.0.0.1", port=free_port()), "line",
                              tmp_path / "outbox.sqlite")   # no broker: events wait in the outbox
    append, calls = publisher.outbox.append, []

    def faulty_append(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return append(items)

    publisher.outbox.append = faulty_append
    try:
        publisher.publish("alarm", {"text": "lost with the fault"})
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        publisher.publish("alarm", {"text": "stored after it"})
        while len(publisher.outbox) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(publisher.outbox) == 1 and publisher._thread.is_alive()
    finally:
        publisher.close(flush_s=0)


def links_whose_heartbeat_fails(monkeypatch, failing: int) -> list:
    """Make the first ``failing`` reject links the line opens fail at their first heartbeat (their worker then
    stops and alarms, as on a fault it cannot survive); returns the links opened."""
    real_open, opened = output_stage.open_link, []

    def open_link(*args, **kwargs):
        link = real_open(*args, **kwargs)
        opened.append(link)
        if len(opened) <= failing:
            def heartbeat():
                raise RuntimeError("heartbeat encoder fault")
            link._heartbeat = heartbeat   # the worker's next heartbeat job raises
        return link

    monkeypatch.setattr(output_stage, "open_link", open_link)
    return opened


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the link re-raises it
def test_a_reject_link_whose_worker_dies_is_opened_again_and_every_verdict_is_acknowledged(
        toy_model, tmp_path, plc, files, monkeypatch):
    opened = links_whose_heartbeat_fails(monkeypatch, failing=1)
    line, _, rows = run_scripted(line_config(toy_model, tmp_path, plc), files, interval_s=0.15)
    assert len(opened) == 2
    assert_one_acked_row_per_part(rows, len(files))   # what the dead link held was re-sent by the new one
    assert any("the zmq reject link stopped (reject link worker stopped: RuntimeError('heartbeat encoder fault')"
               in a and a.endswith("opening it again") for a in line.stats.alarms), list(line.stats.alarms)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_reject_link_that_keeps_dying_stops_the_line_naming_it(toy_model, tmp_path, plc, files, monkeypatch):
    """A line that cannot signal must not run on looking healthy: LineStopped (exit 3), and its next start
    re-sends whatever is unacknowledged."""
    links_whose_heartbeat_fails(monkeypatch, failing=10**6)
    line = Line(line_config(toy_model, tmp_path, plc), source=ScriptedSource(files, interval_s=0.5))
    with pytest.raises(LineStopped, match=r"the zmq reject link stopped 3 times within 60 s \(reject link worker "
                                          r"stopped: RuntimeError\('heartbeat encoder fault'\)"):
        line.run()
