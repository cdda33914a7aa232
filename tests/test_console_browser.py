"""The console in a real headless Chromium (Debian's, driven by Playwright): two real nodes with a
deployed app, `flask immutant console` as a real process; log in, see both nodes' contexts,
disable one, see it in the page and in the store. Saves a screenshot; with
IMMUTANT_UPDATE_SCREENSHOT=1 it replaces docs/console.png (so a test run leaves the tree clean).

This test never skips: `.ci/run` installs chromium, so a missing browser is a failure.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_immutant.contexts import registry
from flask_immutant.keys import Keys

from support import NodeProcess, run_flask, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console.png"

APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension, daemons, jobs, messaging

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)
messaging.start("/queue/orders", app=app)


@messaging.listen("/queue/orders", app=app)
def order(n):
    pass


def ticker():
    ctx = daemons.current()
    while ctx is not None and not ctx.wait(1.0):
        pass


daemons.start("ticker", ticker, app=app)


@jobs.schedule("report", every="30s", app=app)
def report():
    pass


@app.get("/")
def index():
    return "shop"
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it)", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_log_in_see_both_nodes_and_disable_a_context(start_node, node_env, tmp_path, store_client, cluster_name,
                                                     immutant_home, browser):
    keys = Keys(cluster_name)
    # Given two nodes with an app deployed (queue, singleton daemon, job)
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "app.py").write_text(APP)
    a = start_node("--clustered", "--node-name", "a", cwd=tmp_path)
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", cwd=tmp_path)
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    result = run_flask(["immutant", "deploy", "--name", "shop"], node_env, cwd=tmp_path / "shop")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: len(registry.contexts(store_client, keys)) == 2, timeout=30, message="both contexts")

    # And the standalone console
    port = free_port()
    console = NodeProcess(["immutant", "console", "--port", str(port)], node_env, cwd=tmp_path)
    try:
        console.wait_for("console for cluster", timeout=20)
        secret = (immutant_home / "secret").read_text().strip()
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        # When the operator opens it and logs in with the cluster secret
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#token", "not the secret")
        page.click("#login button[type=submit]")
        page.wait_for_selector("#login-error:has-text('wrong cluster secret')")
        page.fill("#token", secret)
        page.click("#login button[type=submit]")

        # Then both nodes' contexts show, enabled, with a load factor
        for node in ("a", "b"):
            page.wait_for_selector(f"#contexts tr[data-key='{node}|/'][data-state='ENABLED']", timeout=10_000)
            page.wait_for_selector(f"#nodes tr[data-node='{node}']")
        page.wait_for_selector("#deployments td:has-text('shop')")
        page.wait_for_selector("#daemons td:has-text('ticker')", timeout=10_000)
        page.wait_for_selector("#queues td:has-text('/queue/orders')", timeout=10_000)
        page.wait_for_selector("#jobs td:has-text('report')", timeout=10_000)

        # When "disable" is clicked on node a's context
        page.click("#contexts tr[data-key='a|/'] button.act.disable")

        # Then the page shows it DISABLED (b still ENABLED), and so does the store
        page.wait_for_selector("#contexts tr[data-key='a|/'][data-state='DISABLED']", timeout=5_000)
        assert page.get_attribute("#contexts tr[data-key='b|/']", "data-state") == "ENABLED"
        assert {c.node: c.state for c in registry.contexts(store_client, keys)} == {"a": "DISABLED", "b": "ENABLED"}
        # The session cookie is out of JavaScript's reach
        cookies = page.context.cookies()
        assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("immutant_console", True, "Strict")]
        assert page.evaluate("document.cookie") == ""

        page.wait_for_timeout(300)  # let the daemon holder and the load bars settle for the picture
        screenshot = DOCS_SCREENSHOT if os.environ.get("IMMUTANT_UPDATE_SCREENSHOT") else tmp_path / "console.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        console.cleanup()
