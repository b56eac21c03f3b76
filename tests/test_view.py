"""The operator view over HTTP, against the ledger and archive of a real (short, simulated) line run with
the toy model: every endpoint, what it shows compared with the ledger itself, escaping, path safety, and
that nothing can be changed through it."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from starlette.testclient import TestClient

from musc_edge.edge.config import ConfigError, ViewSettings, parse_config
from musc_edge.edge.ledger import Ledger
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import PartRecord, Reason, Verdict
from musc_edge.edge.runtime.line import Line
from musc_edge.edge.view.app import create_app
from musc_edge.edge.view.figures import score_histogram, shift_start
from musc_edge.edge.view.server import view_options

from .test_runtime import make_parts, raw_config

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ["/", "/part/1", "/api/live", "/api/part/1", "/archive/1/image", "/healthz", "/static/view.js"]


def options(storage: Path, **settings):
    return view_options(storage, None, ViewSettings(**settings), "bottle-3")


@contextmanager
def running_line(model: Path, folder: Path, n_parts: int, rate: float):
    """A simulated line (toy model, ZeroMQ PLC simulator) running in a background thread."""
    parts = make_parts(folder / "parts", n_parts)
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        raw = raw_config(model, parts, folder / "line", {"type": "zmq", "endpoint": plc.address})
        raw["source"]["rate"] = rate
        line = Line(parse_config(raw))
        thread = threading.Thread(target=line.run, name="test-line", daemon=True)
        thread.start()
        try:
            yield line
        finally:
            line.stop()
            thread.join(timeout=30)


@pytest.fixture(scope="module")
def storage(toy_model, tmp_path_factory) -> Path:
    """The storage dir of a finished 24-part line run: ledger, archive (rejects, warm-up parts), pools."""
    folder = tmp_path_factory.mktemp("view_line")
    with running_line(toy_model, folder, 24, rate=8.0) as line:
        deadline = time.monotonic() + 60
        while line.stats.parts < 24 and time.monotonic() < deadline:
            time.sleep(0.05)
    while line.archive is None or line.archive.counters().queued:
        time.sleep(0.05)
    return folder / "line"


@pytest.fixture(scope="module")
def rows(storage):
    with Ledger.open_readonly(storage / "ledger.sqlite") as reader:
        return list(reader.iter_rows())


@pytest.fixture(scope="module")
def client(storage):
    with TestClient(create_app(options(storage, recent=6))) as c:
        yield c


def test_the_fixture_line_has_rejects_and_no_verdict_parts(rows):
    verdicts = {r.verdict for r in rows}
    assert len(rows) == 24 and verdicts == {Verdict.ACCEPT, Verdict.REJECT, Verdict.NO_VERDICT}


def test_live_feed_counts_what_the_ledger_holds(client, rows):
    page = client.get("/api/live").json()
    c = page["counters"]
    assert (c["parts"], c["ok"], c["ng"], c["no_verdict"]) == (
        24, *(sum(r.verdict == v for r in rows) for v in (Verdict.ACCEPT, Verdict.REJECT, Verdict.NO_VERDICT)))
    no_verdict = [r.reason.label for r in rows if r.verdict == Verdict.NO_VERDICT]
    assert c["no_verdict_by_reason"] == {label: no_verdict.count(label) for label in set(no_verdict)}
    assert c["reject_rate"] == pytest.approx(c["ng"] / 24)
    assert sum(b["parts"] for b in page["rate"]["buckets"]) == 24
    assert sum(b["ng"] for b in page["rate"]["buckets"]) == c["ng"]
    total = [1e3 * r.total_s for r in rows]
    assert page["latency_ms"]["total"]["max"] == pytest.approx(max(total))
    assert page["latency_ms"]["total"]["n"] == 24
    assert page["live"]["running"] is False and "control.sock" in page["live"]["error"]


def test_live_feed_lists_the_newest_rejects_and_no_verdict_parts_with_their_overlays(client, rows):
    flagged = client.get("/api/live").json()["flagged"]
    expected = [r for r in reversed(rows) if r.verdict != Verdict.ACCEPT][:6]
    assert [p["seq"] for p in flagged] == [r.seq for r in expected]
    for part, row in zip(flagged, expected):
        assert (part["part_id"], part["reason"], part["score"]) == (row.part_id, row.reason.label, row.score)
        # Scored rejects have a heat map; warm-up parts only their image; both a dashboard thumbnail.
        if row.reason in (Reason.ANOMALY, Reason.WARMUP):
            assert set(part["images"]) == ({"image", "overlay", "thumb"} if row.reason == Reason.ANOMALY
                                           else {"image", "thumb"})


def test_histogram_covers_the_recent_scored_parts_and_marks_the_threshold(client, rows):
    hist = client.get("/api/live").json()["histograms"]["default"]
    scored = [r for r in rows if r.score is not None]
    assert hist["n"] == len(scored) and hist["threshold"] == 1.0
    assert sum(hist["rejected"]) == sum(r.verdict == Verdict.REJECT for r in scored)
    assert sum(hist["accepted"]) + sum(hist["rejected"]) == len(scored)
    assert hist["lo"] < min(r.score for r in scored) and hist["hi"] > max(r.score for r in scored)


def test_dashboard_is_server_rendered_self_contained_and_read_only(client, rows):
    reply = client.get("/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    html = reply.text
    ng = sum(r.verdict == Verdict.REJECT for r in rows)
    assert re.search(rf'id="ng">{ng}<', html) and re.search(r'id="parts">24<', html)
    newest_reject = next(r for r in reversed(rows) if r.verdict == Verdict.REJECT)
    assert f'href="/part/{newest_reject.seq}"' in html and f'src="/archive/{newest_reject.seq}/thumb"' in html
    # Nothing from outside this process: no CDN, no inline script (the CSP forbids it anyway).
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/view.js">']
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    for path in ("/static/view.js", "/static/view.css", "/static/favicon.svg"):
        assert client.get(path).status_code == 200


def test_part_page_shows_score_threshold_reason_and_calibration(client, rows):
    row = next(r for r in reversed(rows) if r.verdict == Verdict.REJECT)
    html = client.get(f"/part/{row.seq}").text
    for text in (row.part_id, f"{row.score:.4f}", f"{row.threshold:.4f}", "REJECT (anomaly)",
                 f"<td>{row.calibration_version}</td>", f'src="/archive/{row.seq}/overlay"'):
        assert text in html
    data = client.get(f"/api/part/{row.seq}").json()
    assert (data["seq"], data["score"], data["calibration_version"]) == (row.seq, row.score, row.calibration_version)
    assert client.get("/part/999").status_code == 404
    assert client.get("/api/part/999").json() == {"error": "no part with sequence number 999 in the ledger"}


def test_archive_images_are_served_by_sequence_number_from_the_archive_only(client, rows, storage):
    row = next(r for r in reversed(rows) if r.reason == Reason.ANOMALY)
    for kind, suffix, mime in (("image", ".png", "image/png"), ("overlay", "_overlay.jpg", "image/jpeg")):
        reply = client.get(f"/archive/{row.seq}/{kind}")
        assert reply.status_code == 200 and reply.headers["content-type"] == mime
        on_disk = next(storage.glob(f"archive/*/*_{row.part_id}_REJECT_anomaly_{row.seq}{suffix}"))
        assert reply.content == on_disk.read_bytes()
    warmup = next(r for r in rows if r.reason == Reason.WARMUP)
    assert client.get(f"/archive/{warmup.seq}/overlay").status_code == 404   # no heat map for a warm-up part
    for part, kind in ((row, "overlay"), (warmup, "image")):   # thumbnails: of the overlay, else of the image
        reply = client.get(f"/archive/{part.seq}/thumb")
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
        thumb = cv2.imdecode(np.frombuffer(reply.content, np.uint8), cv2.IMREAD_COLOR)
        full = cv2.imdecode(np.frombuffer(client.get(f"/archive/{part.seq}/{kind}").content, np.uint8),
                            cv2.IMREAD_COLOR)
        assert max(thumb.shape[:2]) <= 192 < max(full.shape[:2]) or thumb.shape == full.shape
        small = cv2.resize(full, thumb.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(small.astype(int) - thumb).mean() < 8, f"the {kind} thumbnail is not of the {kind}"
    assert client.get("/archive/999/thumb").status_code == 404
    ledger_bytes = (storage / "ledger.sqlite").read_bytes()[:16]
    for path in (f"/archive/{row.seq}/ledger", f"/archive/{row.seq}/..%2F..%2Fledger.sqlite",
                 "/archive/../ledger.sqlite", "/static/../ledger.sqlite", "/static/..%2F..%2F..%2Fconfig.py",
                 "/static/%2e%2e/app.py", "/archive/-1/image"):
        reply = client.get(path)
        assert reply.status_code == 404, path
        assert ledger_bytes not in reply.content and b"import" not in reply.content


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_nothing_can_be_changed_through_the_view(client, method):
    for path in ROUTES:
        assert client.request(method, path).status_code == 405, (method, path)


def test_everything_from_the_ledger_is_escaped(tmp_path):
    storage = tmp_path / "line"
    storage.mkdir()
    evil = '<script>alert("x")</script>'
    with Ledger(storage / "ledger.sqlite") as ledger:
        part = PartRecord(part_id=evil, recipe="default", capture_time=time.time())
        part.decide(Verdict.NO_VERDICT, Reason.DECODE_ERROR, detail='<img src=x onerror="alert(1)">')
        part.signalled = Verdict.REJECT
        ledger.reserve(part, model_hash="m", config_hash="c", calibration_version="<b>7</b>")
    with TestClient(create_app(options(storage))) as c:
        for path in ("/", "/part/1"):
            html = c.get(path).text
            assert "<script>alert" not in html and "<img src=x" not in html and "<b>7" not in html
            assert "&lt;script&gt;alert(" in html
        assert c.get("/api/live").json()["flagged"][0]["part_id"] == evil   # JSON carries the text as text


def test_the_view_waits_for_a_line_that_has_not_run_yet(tmp_path, toy_model):
    storage = tmp_path / "line"
    with TestClient(create_app(options(storage), refresh_s=0.2)) as c:
        assert c.get("/api/live").json()["ledger"] is False
        assert c.get("/").status_code == 200 and c.get("/part/1").status_code == 404
        storage.mkdir()
        with Ledger(storage / "ledger.sqlite") as ledger:
            part = PartRecord(part_id="p1", recipe="default", capture_time=time.time())
            part.decide(Verdict.ACCEPT, Reason.OK)
            part.signalled, part.score, part.threshold = Verdict.ACCEPT, 0.5, 1.0
            ledger.reserve(part, model_hash="m", config_hash="c", calibration_version="3")
        time.sleep(0.15)   # past the snapshot's refresh period
        page = c.get("/api/live").json()
        assert page["ledger"] is True and page["counters"]["ok"] == 1


def test_live_health_and_moving_counters_while_the_line_runs(toy_model, tmp_path):
    with running_line(toy_model, tmp_path, 40, rate=6.0) as line:
        with TestClient(create_app(options(tmp_path / "line"), refresh_s=0.2)) as c:
            seen = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len({p["counters"]["parts"] for p in seen}) < 3:
                page = c.get("/api/live").json()
                if page["ledger"] and page["live"]["running"]:
                    seen.append(page)
                time.sleep(0.3)
            assert line.stats.parts < 40   # still running: these figures were live
    counts = [p["counters"]["parts"] for p in seen]
    assert len(set(counts)) >= 3 and counts == sorted(counts), counts
    live = seen[-1]["live"]
    assert live["link"]["connected"] is True and live["calibration_version"] == "0"
    assert live["pools"]["default"]["capacity"] == 10 and live["pools"]["default"]["size"] >= 4
    assert "raw_scores" not in live["pools"]["default"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_musc_edge_view_serves_on_localhost_by_default(storage):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "musc_edge.edge.cli", "view", "--dir", str(storage), "--port", str(port)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()
        assert f"http://127.0.0.1:{port}/" in banner and "read-only" in banner
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/live", timeout=5) as reply:
                    assert b'"parts":24' in reply.read()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "musc-edge view did not come up"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with pytest.raises(SystemExit):
        from musc_edge.edge.cli import build_parser
        build_parser().parse_args(["view", "--port", "x"])


def test_view_config_is_validated_and_leaves_the_config_hash_alone(tmp_path):
    raw = {"source": {"type": "replay", "path": str(tmp_path)},
           "link": {"type": "zmq", "endpoint": "tcp://127.0.0.1:1"}}
    plain, viewed = parse_config(raw), parse_config({**raw, "view": {"enabled": True, "bind": "0.0.0.0"}})
    assert viewed.view.enabled and viewed.view.bind == "0.0.0.0" and plain.view.bind == "127.0.0.1"
    assert plain.config_hash() == viewed.config_hash()   # the view cannot change a verdict
    for bad, key in (({"shifts": ["6:5"]}, "view.shifts"), ({"port": 0}, "view.port"), ({"colour": 1}, "view.colour")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            parse_config({**raw, "view": bad})


def test_shift_start_is_the_latest_start_at_or_before_now():
    tz = timezone.utc
    starts = ("06:00", "14:00", "22:00")
    assert shift_start(datetime(2026, 5, 9, 13, 59, tzinfo=tz), starts) == datetime(2026, 5, 9, 6, 0, tzinfo=tz)
    assert shift_start(datetime(2026, 5, 9, 14, 0, tzinfo=tz), starts) == datetime(2026, 5, 9, 14, 0, tzinfo=tz)
    assert shift_start(datetime(2026, 5, 9, 3, 0, tzinfo=tz), starts) == datetime(2026, 5, 8, 22, 0, tzinfo=tz)
    assert shift_start(datetime(2026, 5, 9, 3, 0, tzinfo=tz), ("07:30",)) == datetime(2026, 5, 8, 7, 30, tzinfo=tz)


def test_score_histogram_splits_accepted_and_rejected_and_spans_the_threshold():
    scores = np.array([0.2, 0.3, 0.35, 0.9, 1.4])
    hist = score_histogram(scores, scores >= 1.0, threshold=1.0, bins=10)
    assert sum(hist["accepted"]) == 4 and sum(hist["rejected"]) == 1
    low = score_histogram(scores[:3], np.zeros(3, bool), threshold=2.0, bins=10)
    assert low["lo"] < 0.2 and low["hi"] > 2.0   # threshold above every score still on the chart
    assert score_histogram(np.array([]), np.array([], bool), 1.0)["n"] == 0


@pytest.mark.slow
def test_musc_edge_run_starts_the_view_beside_the_line_and_stops_it_after(toy_model, tmp_path):
    import json
    import os
    import signal

    import yaml

    from musc_edge.edge.cli import main

    port = free_port()
    pages: list[dict] = []
    returned = threading.Event()

    def watch_then_stop_the_line() -> None:
        deadline = time.monotonic() + 90
        while not returned.is_set() and time.monotonic() < deadline \
                and not any(p["live"]["running"] and (p.get("counters") or {}).get("parts") for p in pages):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/live", timeout=5) as reply:
                    pages.append(json.loads(reply.read()))
            except OSError:
                time.sleep(0.3)
        if not returned.is_set():
            os.kill(os.getpid(), signal.SIGTERM)   # what systemd sends: `run` stops the line, then the view

    parts = make_parts(tmp_path / "parts", 12)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with PlcSimulator.on_zmq("tcp://127.0.0.1:*") as plc:
        raw = raw_config(toy_model, parts, tmp_path / "line", {"type": "zmq", "endpoint": plc.address})
        raw["source"].update(rate=4.0, loop=True, limit=400)
        raw["view"] = {"enabled": True, "port": port}
        config = tmp_path / "line.yaml"
        config.write_text(yaml.safe_dump(raw))
        watcher = threading.Thread(target=watch_then_stop_the_line, daemon=True)
        watcher.start()
        try:
            assert main(["run", "--config", str(config)]) == 0
        finally:
            returned.set()
            watcher.join(timeout=10)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    live = [p for p in pages if p["live"]["running"] and (p.get("counters") or {}).get("parts")]
    assert live, "the view never showed the running line"
    assert live[-1]["line"] == "line" and live[-1]["counters"]["parts"] > 0
    with pytest.raises(OSError):   # the companion process ended with the line
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
