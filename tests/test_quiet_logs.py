"""Quiet logs by default: an idle cluster with a balancer logs (almost) nothing at INFO.

Weight and routing-table changes follow every load-factor wobble of an idle node; they go to DEBUG.
Counted from the real output of real node and balancer processes."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from balancer_support import running_haproxy, start_embedded, start_reconciler

from support import NodeProcess

APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)

@app.get("/")
def index():
    return "idle"
'''

INFO = re.compile(r"^\S+ \S+ INFO ")
#: How long the idle cluster is watched (the nodes publish their load every failure timeout / 4).
WATCH_SECONDS = 8.0


def info_lines(processes: list[NodeProcess]) -> list[str]:
    return [line for p in processes for line in list(p.lines) if INFO.match(line)]


@contextlib.contextmanager
def balancer_process(kind: str, node_env: dict[str, str], folder: Path, cluster: str) -> Iterator[NodeProcess]:
    """The embedded balancer, or the HAProxy reconciler driving a real HAProxy."""
    if kind == "embedded":
        process, _url = start_embedded(node_env, folder)
        try:
            yield process
        finally:
            process.cleanup()
        return
    with running_haproxy(folder, ["/"], cluster) as haproxy:
        process = start_reconciler(node_env, folder, haproxy.socket)
        try:
            yield process
        finally:
            process.cleanup()


#: What the balancer logs once it routes to both nodes (at INFO: the routes changed).
BOTH_ROUTED = {"embedded": r"routing table: .*a@.*b@", "haproxy": r"haproxy: .*server ctx/b"}


@pytest.mark.parametrize("kind", ["embedded", "haproxy"])
def test_an_idle_two_node_cluster_with_a_balancer_logs_almost_nothing_at_info(kind, start_node, node_env,
                                                                              cluster_name, tmp_path: Path):
    # Given two nodes serving an app and a balancer (embedded, or HAProxy and its reconciler), all idle
    app = tmp_path / "idle_app.py"
    app.write_text(APP)
    a = start_node("--clustered", "--node-name", "a", app=str(app))
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", app=str(app))
    for node in (a, b):
        node.wait_for("serves on http")
    with balancer_process(kind, node_env, tmp_path, cluster_name) as balancer:
        processes = [a, b, balancer]
        balancer.wait_for(BOTH_ROUTED[kind], timeout=20)
        time.sleep(1.0)  # the rest of the first pass
        before = len(info_lines(processes))
        # When nothing happens for a while
        time.sleep(WATCH_SECONDS)
        # Then (almost) no INFO line was written: weights and unchanged routes are DEBUG
        added = info_lines(processes)[before:]
        assert len(added) <= 1, "\n".join(added)
