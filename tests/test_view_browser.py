"""The operator view in a real browser: Debian's headless Chromium (driven by Playwright's Python package
over the DevTools protocol; no browser is downloaded) on a 1280 x 800 panel, served by uvicorn while a
simulated line runs. The page must show the counters moving and a reject's heat-map overlay without a
reload. Screenshots go to the test's temporary folder (operator-view.png, operator-view-part.png)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager

import pytest
import uvicorn

from musc_edge.edge.view.app import create_app

from .test_view import options, running_line

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
# Skipped on a developer machine without Chromium; in CI (.ci/run installs it) a missing browser fails.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                 reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")]


@contextmanager
def serving(app):
    """``app`` served by uvicorn on a free 127.0.0.1 port in a background thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_the_page_follows_a_running_line_and_shows_a_rejects_overlay(toy_model, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "no chromium on PATH: .ci/run installs Debian's"
    errors: list[str] = []
    with running_line(toy_model, tmp_path, 48, rate=4.0) as line, \
            serving(create_app(options(tmp_path / "line"), refresh_s=0.5)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        # bypass_csp: Playwright evaluates its wait conditions as strings, which the page's CSP forbids.
        page = browser.new_page(viewport={"width": 1280, "height": 800}, bypass_csp=True)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(url + "/")
        page.wait_for_function("Number(document.getElementById('parts').textContent) > 0", timeout=30_000)
        first = int(page.text_content("#parts"))
        page.wait_for_function(f"Number(document.getElementById('parts').textContent) > {first}", timeout=30_000)
        # A scored reject's overlay, loaded (not a broken image), without reloading the page.
        overlay = "#flagged a.thumb.ng img[src$='/thumb']"
        loaded = f"[...document.querySelectorAll(\"{overlay}\")].some(i => i.complete && i.naturalWidth > 0)"
        page.wait_for_function(loaded, timeout=60_000)
        # The reject tiles, updated in place as rejects come, are the live feed's, newest first.
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(url + "/api/live", timeout=10) as reply:
                want = [f"/part/{part['seq']}" for part in json.load(reply)["flagged"]]
            got = page.eval_on_selector_all("#flagged a.thumb", "tiles => tiles.map((a) => a.getAttribute('href'))")
            if len(want) > 1 and got == want:
                break
            assert time.monotonic() < deadline, f"tiles {got} are not the live feed's {want}"
            page.wait_for_timeout(200)
        page.wait_for_selector("#histograms svg line.threshold", state="attached")
        assert line.stats.parts < 48, "the line had finished: the page did not follow it live"
        assert page.text_content("#run-state") == "RUNNING"
        assert page.is_hidden("#stale")
        page.screenshot(path=str(tmp_path / "operator-view.png"), full_page=True)
        # Everything fits the 1280 x 800 panel: no scrolling.
        assert page.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]") \
            == [1280, 800]

        page.click(overlay)
        page.wait_for_url("**/part/*")
        facts = page.text_content(".facts")
        assert "REJECT (anomaly)" in facts and "calibration version" in facts and "score / threshold" in facts
        assert page.evaluate("document.querySelector('.picture img').naturalWidth") > 0
        page.screenshot(path=str(tmp_path / "operator-view-part.png"))
        browser.close()
    assert not errors, errors
    assert (tmp_path / "operator-view.png").stat().st_size > 10_000
    print(f"screenshots: {tmp_path / 'operator-view.png'}, {tmp_path / 'operator-view-part.png'}")
