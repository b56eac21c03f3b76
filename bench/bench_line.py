"""The line benchmark: MVTec AD bottle (all train/good + test images, seeded shuffle) replayed as a conveyor
through the full runtime, signalled to the PLC simulator over a serial pty pair, ZeroMQ on 127.0.0.1, Modbus TCP
on 127.0.0.1, Modbus RTU over a pty pair, or OPC UA on 127.0.0.1.

Prints per-stage latency percentiles (decode, features, scoring, link), checks that every part has exactly
one ledger row and one acknowledged message, and measures the image AUROC of the streamed scores over the
test images. ``--find-rate`` also searches the highest rate this machine sustains with no NO_VERDICT after
warm-up, i.e. on a part captured after the line's first verdict, with the warm-up over within the first half
of the probe (every NO_VERDICT is printed by reason, before and after the first verdict).
``--view`` runs pairs of line runs, without and with the operator view (``musc-edge view``) open in headless
Chromium (at idle CPU priority, as deploy/operator-kiosk.sh starts a panel; the line starts once the loaded page
has settled), and prints the p99 latencies of both sides and the CPU time of the view process and of the browser.
``--mqtt-outage S`` also publishes every part to a local mosquitto that is stopped for S seconds mid-run, and
checks that every part's event reached the broker afterwards, in order, once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from musc_edge.edge.background import idle_this_thread, lower_this_thread
from musc_edge.edge.config import parse_config
from musc_edge.edge.plc_sim import PlcSimulator
from musc_edge.edge.record import Verdict
from musc_edge.edge.runtime.line import Line

ROOT = Path(__file__).resolve().parents[1]
LINKS = ("serial", "zmq", "modbus-tcp", "modbus-rtu", "opcua")


@contextmanager
def plc_for(link: str):
    """The simulated PLC for ``link`` and the line's ``link`` config section pointing at it."""
    from musc_edge.edge.telemetry.local_broker import free_port

    with ExitStack() as stack:
        if link in ("serial", "zmq"):
            plc = stack.enter_context(PlcSimulator.on_pty() if link == "serial"
                                      else PlcSimulator.on_zmq("tcp://127.0.0.1:*"))
            key = "url" if link == "serial" else "endpoint"
            yield plc, {"type": link, key: plc.address}
            return
        from musc_edge.edge.plc_sim.modbus import ModbusPlcSimulator, PtyPair

        if link == "modbus-tcp":
            port = free_port()
            yield stack.enter_context(ModbusPlcSimulator.on_tcp("127.0.0.1", port)), {"type": link, "port": port}
        elif link == "modbus-rtu":
            pair = stack.enter_context(PtyPair())
            plc = stack.enter_context(ModbusPlcSimulator.on_rtu(pair.b, parity="N"))
            yield plc, {"type": link, "port": pair.a, "parity": "N"}
        else:
            from musc_edge.edge.plc_sim.opcua import OpcUaPlcSimulator

            endpoint = f"opc.tcp://127.0.0.1:{free_port()}/musc-edge/"
            plc = stack.enter_context(OpcUaPlcSimulator(endpoint, "plc", "bench"))
            yield plc, {"type": link, "endpoint": endpoint, "users": [{"username": "plc", "password": "bench"}]}


def bottle_paths(data: Path) -> list[str]:
    root = data / "mvtec_ad" / "bottle"
    if not root.is_dir():
        sys.exit(f"bench_line: no data at {root}")
    return sorted(str(p) for p in [*root.glob("train/good/*.png"), *root.glob("test/*/*.png")])


DEADLINE_MS = 1500.0
PROBE_PARTS = 120   # --find-rate: parts per probed rate (the warm-up must end within the first half)


def run(paths: list[str], link: str, rate: float, out: Path, threshold: float, pool: int, limit: int | None = None,
        quiet: bool = False, mqtt_outage: float = 0.0, model: Path = ROOT / "models" / "dinov2_vits14_musc.onnx",
        precision: str = "fp32", scorer: str = "auto", keep_totals: bool = False, fast_path: str = "auto",
        agree_with: Path | None = None, look_ahead: int | None = None, pool_scale: str = "frozen") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    with plc_for(link) as (plc, link_cfg), ExitStack() as stack:
        outage = stack.enter_context(MqttOutage(out / "broker", mqtt_outage)) if mqtt_outage else None
        config = parse_config({
            "line": {"name": f"bottle-{link}", "deadline_ms": DEADLINE_MS, "queue_size": 4},
            "model": {"path": str(model), "size": 224, "blocks": [6, 9], "precision": precision,
                      "fast_path": fast_path},
            "scoring": {"backend": scorer},
            "recipes": {"default": {"threshold": threshold, "pool": {"capacity": pool, "min_size": 10,
                                                                          "scale": pool_scale},
                                    **({"look_ahead": {"parts": look_ahead}} if look_ahead is not None else {})}},
            "source": {"type": "replay", "paths": paths, "rate": rate, "shuffle": True, "seed": 0,
                       **({"limit": limit} if limit else {})},
            "link": {**link_cfg, "heartbeat_interval_s": 1.0},
            "storage": {"dir": str(out), "archive": {"quota_mb": 200}},
            **({"telemetry": outage.telemetry()} if outage else {}),
        }, "bench_line")
        line = Line(config, status=None if quiet else (lambda text: print("  " + text, file=sys.stderr)))
        t0 = time.monotonic()
        if outage:
            outage.schedule()
        stats = line.run()
        wall = time.monotonic() - t0
        received = sorted(v.seq for v in plc.received())
        rows = line.ledger_rows()
        mqtt = outage.check(rows) if outage else None
    n = limit or len(paths)
    test = [r for r in rows if "/test/" in (r.source_ref or "")]
    scored = [r for r in test if r.score is not None]
    labels = [int("/good/" not in r.source_ref) for r in scored]
    warmup = warm_up(rows)
    result = {
        "link": link, "rate": rate, "parts": n, "ledger_rows": len(rows), "wall_s": round(wall, 1),
        "one_row_per_part": len(rows) == n and len({r.part_id for r in rows}) == n,
        "one_ack_per_part": all(r.acked for r in rows) and received == [r.seq for r in rows],
        "verdicts": {v.value: sum(r.verdict == v for r in rows) for v in Verdict},
        **warmup,
        "test_images": len(test), "test_scored": len(scored),
        "test_image_auroc": round(100 * roc_auc_score(labels, [r.score for r in scored]), 2) if len(set(labels)) == 2 else None,
        "latency_ms": {stage: stats.percentiles(stats.stages[stage]) for stage in stats.stages},
    }
    # Deadline margin: how long before its deadline each signalled part's verdict was acknowledged (the line's
    # deadline_ms; look-ahead verdicts spend part of it waiting for later parts). p99 is the margin 99 % exceed.
    margins = sorted(DEADLINE_MS - 1000 * t for t in stats.stages["total"])
    if margins:
        at = lambda q: round(margins[min(len(margins) - 1, int(q * len(margins)))], 1)  # noqa: E731
        result["deadline_margin_ms"] = {"p50": at(0.5), "p99": at(0.01), "min": round(margins[0], 1)}
    result["acked_after_deadline"] = sum(bool(r.ack_late) for r in rows)
    if keep_totals:   # every part's capture-to-ack latency, for --view to pool over runs
        result["totals_ms"] = [1000 * t for t in stats.stages["total"]]
    # Every signalled part, whatever its reason: the time send() took from the ledger row to the PLC's ACK.
    link_times = sorted(1000 * r.link_s for r in rows if r.link_s is not None)
    if link_times:
        pick = lambda q: round(link_times[min(len(link_times) - 1, int(q * len(link_times)))], 2)  # noqa: E731
        result["link_latency_ms"] = {"n": len(link_times), "p50": pick(0.5), "p99": pick(0.99),
                                     "max": round(link_times[-1], 2)}
    if mqtt is not None:
        result["mqtt_outage"] = mqtt
    from musc_edge.edge.runtime.calibration_state import CalibrationStore

    decided = [r for r in CalibrationStore(out).audit.records() if r.get("action") == "runtime.fast_path"]
    result["fast_path"] = decided[-1]["reason"] if decided else \
        "no decision in the audit log (model.fast_path off or not applicable, or the warm-up never finished)"
    if agree_with is not None:
        result["verdict_agreement"] = verdict_agreement(rows, agree_with)
    hashes = [r.model_hash for r in rows]
    result["rows_per_model"] = {h: hashes.count(h) for h in dict.fromkeys(hashes)}   # fp32 rows, then fast ones
    return result


def warm_up(rows: list) -> dict:
    """Every NO_VERDICT by reason, split at the line's first verdict (ACCEPT or REJECT): a part captured before
    that row was written arrived while the line was still warming up (pool not ready, or the fast-path trial not
    decided; its NO_VERDICT, whatever the reason, is warm-up); a NO_VERDICT of a part captured after it, whatever
    the reason, is one after warm-up. A run that never gave a verdict has no end of warm-up (None)."""
    first = min((r.created for r in rows if r.verdict != Verdict.NO_VERDICT), default=None)
    start = min((r.capture_time for r in rows), default=None)
    before = [r for r in rows if first is None or r.capture_time < first]

    def by_reason(side: list) -> dict[str, int]:
        labels = [r.reason.label for r in side if r.verdict == Verdict.NO_VERDICT]
        return {label: labels.count(label) for label in dict.fromkeys(labels)}
    return {"warmup_parts": len(before),
            "first_verdict_s": None if first is None else round(first - start, 2),
            "no_verdict_during_warmup": by_reason(before),
            "no_verdict_after_warmup": by_reason([r for r in rows if first is not None and r.capture_time >= first])}


def verdict_agreement(rows: list, ledger: Path) -> dict:
    """Share of the parts both this run and another run's ``ledger`` decided (ACCEPT or REJECT) with the same
    verdict, matched by the image each part came from (e.g. the fast path against an fp32 run)."""
    from musc_edge.edge.ledger import Ledger

    from musc_edge.export.verify import verdict_flips

    reader = Ledger.open_readonly(ledger)
    try:
        other = {r.source_ref: r for r in reader.iter_rows() if r.verdict != Verdict.NO_VERDICT}
    finally:
        reader.close()
    both = [(r, other[r.source_ref]) for r in rows if r.verdict != Verdict.NO_VERDICT and r.source_ref in other]
    same = sum(a.verdict == b.verdict for a, b in both)
    # the other run's scores as the parent's: a flip within the verify gate's allowed drift of the threshold is
    # borderline (export/verify.py: verdict_flips), one farther out decisive
    flipped = [(a, b) for a, b in both if a.verdict != b.verdict]
    _, near = verdict_flips(np.array([b.score for _, b in flipped]), np.array([a.score for a, _ in flipped]),
                            np.array([b.threshold for _, b in flipped]))
    borderline = int(near.sum())
    return {"parts": len(both), "same": same, "percent": round(100 * same / len(both), 2) if both else None,
            "borderline_flips": borderline, "decisive_flips": len(both) - same - borderline}


def retry_until_up(first_request, within_s: float = 30.0) -> None:
    """Retry ``first_request()`` until it succeeds (the view process may still be importing)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            first_request()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


SETTLE_S = 5.0   # --view: seconds between the page's load and the line's start


class OpenView:
    """``musc-edge view`` on the line's storage dir, open in headless Chromium (polling) while the line runs.

    The view process starts before the line (it waits for the ledger); at the end the page's part counter
    must equal the ledger's, which shows the page was live throughout.
    """

    def __init__(self, storage: Path, port: int = 8751, browser_priority: str = "idle",
                 client: str = "chromium") -> None:
        shutil.rmtree(storage, ignore_errors=True)
        self.browser_priority, self.client = browser_priority, client
        self.url = f"http://127.0.0.1:{port}/"
        self.process = subprocess.Popen([sys.executable, "-m", "musc_edge.edge.cli", "view", "--dir", str(storage),
                                         "--port", str(port)], cwd=ROOT, stderr=subprocess.DEVNULL)
        self._opened, self._done = threading.Event(), threading.Event()
        self.expected = 0
        self.page_parts: int | None = None
        self._thread = threading.Thread(target=self._browse if client == "chromium" else self._poll, daemon=True)
        self._thread.start()
        if not self._opened.wait(60):
            self.close()
            sys.exit("bench_line --view: the page did not open in headless Chromium")

    def _browse(self) -> None:
        from playwright.sync_api import sync_playwright

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        # Priority is per thread and inherited: set here, before Playwright starts its driver and the driver
        # Chromium, it covers every process and thread of the browser, as deploy/operator-kiosk.sh does.
        if self.browser_priority == "idle":
            idle_this_thread()
        else:
            lower_this_thread(int(self.browser_priority))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
            retry_until_up(lambda: page.goto(self.url))
            # A kiosk's page has been open for hours: the browser's first seconds after a load (about half a
            # core for a second on the 2-core machine, then 1-2 %) are not what a line beside it sees.
            time.sleep(SETTLE_S)
            self._opened.set()
            self._done.wait()
            try:   # the page catches up at its next refresh(es) after the last part
                page.wait_for_function(f"Number(document.getElementById('parts').textContent) >= {self.expected}",
                                       timeout=20_000)
            except Exception:   # not live: page_parts says what it showed
                pass
            self.page_parts = int(page.text_content("#parts"))
            browser.close()

    def _poll(self, refresh_s: float = 2.0) -> None:
        """A panel on another machine, as the device sees it: the page's requests (the live feed every refresh,
        each new thumbnail once), without the rendering."""
        import urllib.request

        def get(path: str) -> bytes:
            with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=10) as reply:
                return reply.read()
        retry_until_up(lambda: get("/"))
        self._opened.set()
        seen: set[str] = set()
        done_at = None
        while True:
            page = json.loads(get("/api/live"))
            for part in page.get("flagged", []):
                thumb = part["images"].get("thumb")
                if thumb and thumb not in seen:
                    seen.add(thumb)
                    get(thumb)
            if self._done.is_set():
                done_at = done_at or time.monotonic()
                parts = page.get("counters", {}).get("parts", 0)
                if parts >= self.expected or time.monotonic() - done_at > 20:
                    self.page_parts = parts
                    return
            time.sleep(refresh_s)

    @staticmethod
    def _processes() -> dict[int, tuple[int, float]]:
        """{pid: (parent pid, CPU seconds used)} of every process (Linux /proc)."""
        stats = {}
        for folder in Path("/proc").glob("[0-9]*"):
            try:
                fields = (folder / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:   # gone meanwhile
                continue
            stats[int(folder.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return stats

    def _browser_pids(self, stats: dict | None = None) -> set[int]:
        """Every process descending from this one but the view (Playwright's driver, Chromium)."""
        stats = self._processes() if stats is None else stats
        ours, grew = {os.getpid()}, True
        while grew:
            found = {pid for pid, (parent, _) in stats.items() if parent in ours} - ours
            ours |= found
            grew = bool(found)
        return ours - {os.getpid(), self.process.pid}

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time (user + system) used so far by the view process and by the browser."""
        stats = self._processes()
        browser = sum(stats[pid][1] for pid in self._browser_pids(stats))
        return stats.get(self.process.pid, (0, 0.0))[1], browser

    def close(self, expected_parts: int = 0) -> None:
        """Stop browsing once the page shows ``expected_parts`` (the ledger's rows), or after 20 s."""
        self.expected = expected_parts
        self._done.set()
        self._thread.join(timeout=30)
        self.process.terminate()
        self.process.wait(timeout=10)


def pooled_p99(runs: list[dict]) -> float | None:
    """p99 of the capture-to-ack latency over the parts of all ``runs`` together (ms)."""
    totals = sorted(t for r in runs for t in r["totals_ms"])
    return round(totals[min(len(totals) - 1, int(0.99 * len(totals)))], 1) if totals else None


def compare_with_view(paths: list[str], link: str, rate: float, out: Path, threshold: float, pool: int,
                      limit: int | None, pairs: int = 2, browser_priority: str = "idle", client: str = "chromium",
                      **line) -> dict:
    """``pairs`` pairs of the same line run, one without and one with the operator view open in headless
    Chromium, the order alternating (without first, then with first, ...) so a drift in the machine's speed
    falls on both sides. The p99s compared are over the parts of all runs of each side together: one run's
    p99 is its third-slowest part of 292, too few to tell a 10 % difference from chance."""
    plain, viewed, view_cpu, browser_cpu, page_live = [], [], 0.0, 0.0, []
    for pair in range(pairs):
        for with_view in ((False, True) if pair % 2 == 0 else (True, False)):
            if not with_view:
                plain.append(run(paths, link, rate, out, threshold, pool, limit, quiet=True, keep_totals=True, **line))
                continue
            view = OpenView(out.with_name(out.name + "_view"), browser_priority=browser_priority, client=client)
            try:
                before = view.cpu_seconds()
                viewed.append(run(paths, link, rate, out.with_name(out.name + "_view"), threshold, pool, limit,
                                  quiet=True, keep_totals=True, **line))
                used = [b - a for a, b in zip(before, view.cpu_seconds())]
                view_cpu, browser_cpu = view_cpu + used[0], browser_cpu + used[1]
            finally:
                view.close(viewed[-1]["ledger_rows"] if len(viewed) > len(page_live) else 0)
            page_live.append(view.page_parts == viewed[-1]["ledger_rows"])
    p99 = [pooled_p99(side) for side in (plain, viewed)]   # None: no part was scored
    if None in p99:
        print("bench_line --view: a run scored no part (this machine cannot keep up with the rate)", file=sys.stderr)
    wall = sum(r["wall_s"] for r in viewed)
    for r in plain + viewed:
        r.pop("totals_ms")
    return {"link": link, "rate": rate, "parts": plain[0]["parts"], "pairs": pairs, "client": client,
            "browser_priority": browser_priority,
            "p99_ms_without_view": p99[0], "p99_ms_with_view": p99[1],
            "p99_ratio": None if None in p99 else round(p99[1] / p99[0], 3),
            "p99_ms_per_run_without": [r["latency_ms"]["total"].get("p99") for r in plain],
            "p99_ms_per_run_with": [r["latency_ms"]["total"].get("p99") for r in viewed],
            "view_cpu_s": round(view_cpu, 2), "view_cpu_share": round(view_cpu / wall, 4),
            "browser_cpu_s": round(browser_cpu, 2), "browser_cpu_share": round(browser_cpu / wall, 4),
            "page_was_live": all(page_live), "runs": plain + viewed}


class MqttOutage:
    """A local mosquitto the line publishes to, stopped for ``seconds`` from 20 s into the run."""

    def __init__(self, folder: Path, seconds: float, start_after_s: float = 20.0) -> None:
        from musc_edge.edge.telemetry.local_broker import CollectingSubscriber, LocalBroker

        self.seconds, self.start_after_s = seconds, start_after_s
        self.broker = LocalBroker(folder).start()
        self.subscriber = CollectingSubscriber(self.broker.port, "bench/#")
        self.window: tuple[float, float] | None = None

    def telemetry(self) -> dict:
        return {"mqtt": {"enabled": True, "port": self.broker.port, "topic_prefix": "bench"}}

    def schedule(self) -> None:
        def outage() -> None:
            time.sleep(self.start_after_s)
            began = time.monotonic()
            self.broker.stop()
            time.sleep(self.seconds)
            self.broker.start()
            self.window = (began, time.monotonic())

        threading.Thread(target=outage, daemon=True).start()

    def check(self, rows: list) -> dict:
        """Wait for every part's event; did each arrive once, in ledger order?"""
        t0 = time.monotonic()
        while self.window is None and time.monotonic() - t0 < self.start_after_s + self.seconds + 10:
            time.sleep(0.1)
        self.subscriber.wait_for(len(rows), 60.0)
        events = [m for m in self.subscriber.messages if m.get("kind") == "part"]
        seqs = [e["seq"] for e in events]
        return {"outage_s": round(self.window[1] - self.window[0], 1) if self.window else None,
                "parts": len(rows), "events_received": len(events),
                "in_order_once": seqs == [r.seq for r in rows],
                "duplicates": len(seqs) - len(set(seqs)), "drain_s_after_broker_back":
                round(time.monotonic() - self.window[1], 1) if self.window else None}

    def __enter__(self) -> MqttOutage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.subscriber.close()
        self.broker.stop()


def print_result(r: dict) -> None:
    print(f"\n== bottle line over {r['link']} at {r['rate']} parts/s: {r['parts']} parts in {r['wall_s']} s")
    print(f"ledger rows {r['ledger_rows']}  one row per part: {r['one_row_per_part']}  "
          f"one acked message per part: {r['one_ack_per_part']}")
    print(f"verdicts {r['verdicts']}")
    print(f"NO_VERDICT by reason: during warm-up (the {r['warmup_parts']} parts captured before the first verdict, "
          f"given {r['first_verdict_s']} s after the first capture) {r['no_verdict_during_warmup'] or 'none'}; "
          f"after warm-up {r['no_verdict_after_warmup'] or 'none'}")
    print(f"test images {r['test_images']} (scored {r['test_scored']}): image AUROC {r['test_image_auroc']}")
    print(f"fast path: {r['fast_path']}  (ledger rows per model hash: {r['rows_per_model']})")
    if (a := r.get("verdict_agreement")) and a["parts"]:
        print(f"verdict agreement with the other ledger: {a['same']}/{a['parts']} ({a['percent']} %); flips within "
              f"the allowed drift of the threshold {a['borderline_flips']}, farther out {a['decisive_flips']}")
    print(f"{'stage':<9} {'min':>7} {'p50':>7} {'p99':>7} {'max':>7}  ms")
    for stage, p in r["latency_ms"].items():
        if p:
            print(f"{stage:<9} {p['min']:7.1f} {p['p50']:7.1f} {p['p99']:7.1f} {p['max']:7.1f}")
    if "link_latency_ms" in r:
        print(f"link latency over all {r['link_latency_ms']['n']} signalled parts: p50 {r['link_latency_ms']['p50']} "
              f"ms  p99 {r['link_latency_ms']['p99']} ms  max {r['link_latency_ms']['max']} ms")
    if "mqtt_outage" in r:
        print(f"MQTT broker outage: {r['mqtt_outage']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--link", choices=(*LINKS, "both", "all"), default="both",
                        help="both: serial and zmq; all: every link type")
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--pool", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bottle_line"))
    parser.add_argument("--limit", type=int, help="only the first N parts of the shuffled stream")
    parser.add_argument("--find-rate", action="store_true",
                        help="also find the highest rate with no NO_VERDICT after warm-up (after the first verdict)")
    parser.add_argument("--view", action="store_true", help="run pairs of line runs, without and with the "
                        "operator view open in headless Chromium (order alternating), and compare the pooled p99")
    parser.add_argument("--view-pairs", type=int, default=2, help="--view: pairs of runs (without / with the view)")
    parser.add_argument("--browser-priority", default="idle", help="--view: CPU priority of the headless browser: "
                        "idle (Linux SCHED_IDLE, as deploy/operator-kiosk.sh starts a panel on the device) or a "
                        "niceness (0 for a plain browser)")
    parser.add_argument("--view-client", choices=("chromium", "http"), default="chromium",
                        help="--view: headless Chromium on this machine, or a panel elsewhere (its HTTP requests only)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "dinov2_vits14_musc.onnx",
                        help="feature model, or a folder to pick the --precision model covering blocks 6, 9 from")
    parser.add_argument("--precision", choices=("fp32", "int8", "fp16"), default="fp32")
    parser.add_argument("--scorer", choices=("auto", "numpy", "onnx-fp32", "onnx-int8"), default="auto")
    parser.add_argument("--fast-path", choices=("auto", "off"), default="auto",
                        help="model.fast_path: auto (shadow the INT8 path at warm-up and switch when it agrees) or off")
    parser.add_argument("--look-ahead", type=int, metavar="PARTS",
                        help="recipes.default.look_ahead.parts (default: the config default; 0 = figures from before it)")
    parser.add_argument("--pool-scale", choices=("frozen", "members"), default="frozen",
                        help="recipes.default.pool.scale (members: the moving scale of the figures from before it)")
    parser.add_argument("--agree-with", type=Path, metavar="LEDGER",
                        help="report verdict agreement with another run's ledger (e.g. an fp32 run's)")
    parser.add_argument("--mqtt-outage", type=float, default=0.0, metavar="SECONDS",
                        help="publish part events to a local mosquitto stopped this long mid-run (needs mosquitto)")
    args = parser.parse_args()
    paths = bottle_paths(args.data)
    results = []
    if args.view:
        for link in (("serial", "zmq") if args.link == "both" else (args.link,)):
            r = compare_with_view(paths, link, args.rate, args.out, args.threshold, args.pool, args.limit,
                                  args.view_pairs, args.browser_priority, args.view_client, model=args.model,
                                  precision=args.precision, scorer=args.scorer)
            for run_result in r["runs"]:
                print_result(run_result)
            print(f"\n== operator view over {link} at {args.rate} parts/s, {r['pairs']} pairs of runs: total p99 "
                  f"{r['p99_ms_without_view']} ms without, {r['p99_ms_with_view']} ms with the view open (ratio "
                  f"{r['p99_ratio']}; per run {r['p99_ms_per_run_without']} / {r['p99_ms_per_run_with']}); the page "
                  f"followed every run live: {r['page_was_live']}; the view process used {r['view_cpu_s']} CPU-s "
                  f"({100 * r['view_cpu_share']:.1f} % of one core), the browser {r['browser_cpu_s']} CPU-s "
                  f"({100 * r['browser_cpu_share']:.1f} %)")
            results += [*({**x, "view_open": i >= args.view_pairs} for i, x in enumerate(r["runs"])),
                        {"view": {k: v for k, v in r.items() if k != "runs"}}]
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    links = {"both": ("serial", "zmq"), "all": LINKS}.get(args.link, (args.link,))
    for link in links:
        out = args.out if link == links[0] else args.out.with_name(f"{args.out.name}_{link}")
        results.append(run(paths, link, args.rate, out, args.threshold, args.pool, args.limit,
                           mqtt_outage=args.mqtt_outage, model=args.model, precision=args.precision,
                           scorer=args.scorer, fast_path=args.fast_path, agree_with=args.agree_with,
                           look_ahead=args.look_ahead, pool_scale=args.pool_scale))
        print_result(results[-1])
    if args.find_rate:
        rate, best = args.rate, None
        while rate <= 20:
            r = run(paths, "zmq", rate, args.out.with_name("rate_probe"), args.threshold, args.pool, limit=PROBE_PARTS,
                    quiet=True, model=args.model, precision=args.precision, scorer=args.scorer, fast_path=args.fast_path,
                    look_ahead=args.look_ahead, pool_scale=args.pool_scale)
            after = r["ledger_rows"] - r["warmup_parts"]
            # sustained: a warm-up that ends within the first half of the probe, and no NO_VERDICT after it
            ok = r["first_verdict_s"] is not None and after >= PROBE_PARTS // 2 and not r["no_verdict_after_warmup"]
            print(f"rate {rate:4.1f} parts/s: " + (
                f"after warm-up ({after} parts) {r['no_verdict_after_warmup'] or 'no NO_VERDICT'}; during warm-up "
                f"({r['warmup_parts']} parts, first verdict after {r['first_verdict_s']} s) "
                if r["first_verdict_s"] is not None else f"no verdict at all in {r['ledger_rows']} parts: ") +
                f"{r['no_verdict_during_warmup'] or 'none'}; fast path: {r['fast_path'][:70]}")
            if not ok:
                break
            best, rate = rate, rate + 1.0
        print(f"highest sustained rate with no NO_VERDICT after warm-up: {best} parts/s")
        results.append({"highest_rate": best})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
