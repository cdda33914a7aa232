"""A real Prometheus server scrapes two real nodes: counters move as messages flow, and a
failover (SIGKILL of the node holding the daemon's lease) shows in the lease metrics.

Debian's ``prometheus`` binary runs on loopback with a generated configuration scraping both
nodes every half second; everything is checked through its HTTP API with PromQL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import textwrap
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flask_immutant.metrics.http import METRICS_PATH

from support import free_port_base, wait_until

APP = """
from flask import Flask
from flask_immutant import ImmutantExtension

immutant = ImmutantExtension()

@immutant.listen("/queue/prom")
def received(n):
    pass

@immutant.daemon("ticker")
def ticker(ctx):
    n = 0
    while not ctx.wait(0.1):
        n += 1
        immutant.publish("/queue/prom", n)

app = Flask(__name__)
app.config.update(IMMUTANT_CLUSTERED=True, IMMUTANT_METRICS=True)
immutant.init_app(app)
"""

LEASE = 'lease="daemon:ticker"'


class Prometheus:
    """A prometheus server process of this test, and PromQL through its HTTP API."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = process
        self.log = log

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return json.loads(response.read())

    def query(self, promql: str) -> dict[str, float]:
        """``instance`` -> value of each series the instant query returns."""
        answer = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        return {series["metric"].get("instance", ""): float(series["value"][1]) for series in answer["data"]["result"]}

    def wait(self, promql: str, condition: Callable[[dict[str, float]], bool],
             timeout: float = 30.0) -> dict[str, float]:
        """The query's answer once ``condition`` holds for it (polled; fails after ``timeout``)."""

        def answered() -> dict[str, float] | None:
            found = self.query(promql)
            return found if condition(found) else None

        return wait_until(answered, timeout, interval=0.25, message=f"PromQL {promql}")


@pytest.fixture
def prometheus(tmp_path: Path, node_env: dict[str, str]) -> Iterator[Prometheus]:
    """Prometheus on a free loopback port, scraping the two nodes' metrics paths every 0.5 s."""
    binary = shutil.which("prometheus")
    assert binary, "the prometheus tier needs the prometheus binary"
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    config = tmp_path / "prometheus.yml"
    config.write_text(textwrap.dedent(f"""
        global:
          scrape_interval: 500ms
          scrape_timeout: 400ms
        scrape_configs:
          - job_name: immutant
            metrics_path: {METRICS_PATH}
            static_configs:
              - targets: ["127.0.0.1:{base}", "127.0.0.1:{base + 100}"]
    """))
    port = free_port_base(span=0)
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = Prometheus(port, process, log)
    try:
        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(server.url + "/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(ready, 30, interval=0.2, message="prometheus ready")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_prometheus_sees_messages_flow_and_a_failover_in_the_lease_metrics(
        prometheus: Prometheus, start_node, node_env: dict[str, str], tmp_path: Path) -> None:
    # Given two clustered nodes serving an app whose singleton daemon publishes to a queue
    (tmp_path / "prom_app.py").write_text(APP)
    nodes = {"a": start_node("--node-name", "a", app="prom_app.py"),
             "b": start_node("--node-name", "b", "--port-offset", "100", app="prom_app.py")}
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    instance = {"a": f"127.0.0.1:{base}", "b": f"127.0.0.1:{base + 100}"}
    for node in nodes.values():
        node.wait_for(r"serves on http://")
    # And Prometheus scraping both
    prometheus.wait('up{job="immutant"} == 1', lambda found: len(found) == 2)

    # When messages flow, Then the published and delivered counters move between scrapes
    published = 'sum(immutant_messages_published_total{destination="/queue/prom"})'
    delivered = 'sum(immutant_messages_delivered_total{destination="/queue/prom"})'
    first = prometheus.wait(published, lambda found: found.get("", 0) > 0)[""]
    prometheus.wait(published, lambda found: found.get("", 0) >= first + 10)
    first_delivered = prometheus.wait(delivered, lambda found: found.get("", 0) > 0)[""]
    prometheus.wait(delivered, lambda found: found.get("", 0) >= first_delivered + 10)
    prometheus.wait('sum(rate(immutant_message_handler_seconds_count{destination="/queue/prom"}[5s])) > 0',
                    lambda found: bool(found))
    prometheus.wait('max(immutant_cluster_members)', lambda found: found.get("") == 2.0)

    # And exactly one node holds the daemon's lease
    holders = prometheus.wait(f"immutant_lease_holder{{{LEASE}}} == 1", lambda found: len(found) == 1)
    holder = next(name for name, address in instance.items() if address in holders)
    survivor = "b" if holder == "a" else "a"
    assert prometheus.query(f"immutant_lease_holder{{{LEASE}, instance=\"{instance[survivor]}\"}}") == \
        {instance[survivor]: 0.0}
    assert prometheus.query(f'immutant_lease_acquired_total{{{LEASE}, instance="{instance[survivor]}"}}') in \
        ({}, {instance[survivor]: 0.0})

    # When the holder's node is killed with SIGKILL (its runtime dies with it)
    nodes[holder].signal(signal.SIGKILL)

    # Then Prometheus sees it down, the survivor acquire the lease and hold it, and the counters go on
    prometheus.wait(f'up{{instance="{instance[holder]}"}} == 0', lambda found: bool(found))
    prometheus.wait(f'immutant_lease_acquired_total{{{LEASE}, instance="{instance[survivor]}"}} >= 1',
                    lambda found: bool(found))
    prometheus.wait(f'immutant_lease_holder{{{LEASE}, instance="{instance[survivor]}"}} == 1',
                    lambda found: bool(found))
    after = prometheus.wait(f'sum(immutant_messages_published_total{{instance="{instance[survivor]}"}})',
                            lambda found: found.get("", 0) > 0)[""]
    prometheus.wait(f'sum(immutant_messages_published_total{{instance="{instance[survivor]}"}})',
                    lambda found: found.get("", 0) >= after + 10)
