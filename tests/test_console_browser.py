"""The console in a real headless Chromium (Debian's, driven by Playwright): two real nodes with a
deployed app, `flask immutant console` as a real process; log in, see both nodes' contexts,
disable one, see it in the page and in the store; publish messages, SIGKILL the daemon's node and
restart it, and see the past minutes: the events on the timeline, throughput, depth and load
charts from the cluster's samples. Saves a screenshot; with
IMMUTANT_UPDATE_SCREENSHOT=1 it replaces docs/console.png (so a test run leaves the tree clean).

This test never skips: `.ci/run` installs chromium, so a missing browser is a failure.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_immutant import ImmutantState
from flask_immutant.cluster.lease import read_holder
from flask_immutant.contexts import registry
from flask_immutant.keys import Keys
from flask_immutant.messaging.plugin import messaging_of

from support import NodeProcess, run_flask, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console.png"
#: Read at import: the autouse ``clean_env`` fixture removes every IMMUTANT_* variable before a test runs.
UPDATE_SCREENSHOT = bool(os.environ.get("IMMUTANT_UPDATE_SCREENSHOT"))

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
    nodes = {"a": a, "b": b}
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

        # When messages flow, and the daemon's node is killed and comes back
        state = ImmutantState.build({}, environ=node_env)
        messaging = messaging_of(state)
        try:
            for n in range(40):
                messaging.publish("/queue/orders", n)
        finally:
            messaging.publisher.close()
            state.store.close()

        def handled() -> int:
            history = page.evaluate("fetch('api/history?minutes=5').then((r) => r.json())")
            return max([s["queues"].get("/queue/orders", {}).get("handled", 0) for s in history["samples"]] or [0])

        wait_until(lambda: handled() >= 40, timeout=30, message="a history sample counting the 40 messages handled")
        holder = wait_until(lambda: read_holder(store_client, keys, "daemon:ticker"), timeout=10)
        nodes[holder.node].signal(signal.SIGKILL)
        nodes[holder.node].wait()
        wait_until(lambda: (h := read_holder(store_client, keys, "daemon:ticker")) and h.node != holder.node,
                   timeout=15)
        nodes[holder.node] = start_node("--clustered", "--node-name", holder.node, "--port-offset",
                                        "0" if holder.node == "a" else "100", cwd=tmp_path)
        nodes[holder.node].wait_for("joined cluster")

        # Then the past minutes show the deploy, the ctl action and the failover on the timeline,
        # and charts of throughput, depth and load factor drawn from the cluster's samples
        for marker in ("deploy", "ctl", "failover", "join"):
            page.wait_for_selector(f"#timeline circle.ev.{marker}", state="attached", timeout=20_000)
        page.wait_for_selector("#timeline li:has-text('failover: daemon:ticker')", timeout=20_000)
        for chart in ("throughput", "depth", "load"):
            page.wait_for_selector(f"#chart-{chart} svg polyline", state="attached", timeout=20_000)
        history = page.evaluate("fetch('api/history?minutes=5').then((r) => r.json())")
        assert {"a", "b"} <= set(history["samples"][-1]["nodes"])
        slots = [sample["slot"] for sample in history["samples"]]  # two nodes sample: one sample per slot
        assert slots == sorted(set(slots)), slots
        assert [e["fields"]["member"] for e in history["events"] if e["kind"] == "member.left"] == [holder.node]
        page.wait_for_selector("#contexts tr[data-key='a|/']", timeout=20_000)
        page.wait_for_selector("#contexts tr[data-key='b|/']", timeout=20_000)

        page.select_option("#history-minutes", "2")  # the test's minute fills the picture
        page.wait_for_selector("#history-note:has-text('samples')")
        page.wait_for_timeout(1_000)  # the load bars settle for the picture
        screenshot = DOCS_SCREENSHOT if UPDATE_SCREENSHOT else tmp_path / "console.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        console.cleanup()
