"""One suite, both balancers (embedded and HAProxy + reconciler), two real nodes serving an app
with replicated sessions: failover keeps the session, disable drains, stop empties, weights
spread new sessions."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from balancer_support import running_haproxy, start_embedded, start_reconciler

from flask_immutant.contexts import registry
from flask_immutant.keys import Keys

from support import NodeProcess, children_of, pid_alive, run_flask, wait_until

APP = '''
from flask import Flask, request, session
from flask_immutant import ImmutantExtension, get_state

app = Flask(__name__)
app.secret_key = "scenario"
app.config.update(IMMUTANT_CLUSTERED=True, IMMUTANT_SESSIONS=True)
ImmutantExtension(app)

@app.post("/login")
def login():
    session["user"] = request.form["user"]
    return {"node": get_state().node_name, "user": session["user"]}

@app.get("/whoami")
def whoami():
    return {"node": get_state().node_name, "user": session.get("user")}
'''


class Cluster:
    def __init__(self, url: str, nodes: dict[str, NodeProcess], env: dict[str, str]) -> None:
        self.url = url
        self.nodes = nodes
        self.env = env

    def login(self, user: str) -> tuple[requests.Session, str]:
        """A new client logged in through the balancer, and the node that took the session."""
        client = requests.Session()
        response = client.post(f"{self.url}/login", data={"user": user}, timeout=10)
        assert response.status_code == 200, response.text
        return client, str(response.json()["node"])

    def whoami(self, client: requests.Session) -> dict[str, Any]:
        response = client.get(f"{self.url}/whoami", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def new_sessions(self, count: int) -> Counter[str]:
        return Counter(self.login(f"u{i}")[1] for i in range(count))

    def ctl(self, *args: str) -> None:
        result = run_flask(["immutant", "ctl", *args], self.env)
        assert result.returncode == 0, result.stderr


@pytest.fixture(params=["embedded", "haproxy"])
def cluster(request, start_node, node_env, tmp_path: Path, store_client, cluster_name) -> Iterator[Cluster]:
    app = tmp_path / "scenario_app.py"
    app.write_text(APP)
    env = {"IMMUTANT_FAILURE_TIMEOUT": "1.0"}
    nodes = {name: start_node("--clustered", "--node-name", name, *(("--port-offset", "100") if name == "b" else ()),
                              app=str(app), env=env) for name in ("a", "b")}
    keys = Keys(cluster_name)
    wait_until(lambda: {c.node for c in registry.contexts(store_client, keys)} == {"a", "b"}, timeout=30,
               message="both nodes' contexts")
    balancer_env = {**node_env, **env}
    if request.param == "embedded":
        process, url = start_embedded(balancer_env, tmp_path)
        try:
            yield ready(Cluster(url, nodes, balancer_env))
        finally:
            process.cleanup()
        return
    with running_haproxy(tmp_path, ["/"], cluster_name) as haproxy:
        reconciler = start_reconciler(balancer_env, tmp_path, haproxy.socket)
        try:
            yield ready(Cluster(haproxy.url, nodes, balancer_env))
        finally:
            reconciler.cleanup()


def ready(cluster: Cluster) -> Cluster:
    def both_serve() -> bool:
        try:
            return set(cluster.new_sessions(6)) == {"a", "b"}
        except AssertionError:
            return False

    wait_until(both_serve, timeout=15, message="the balancer sends new sessions to both nodes")
    return cluster


def sigkill_node(node: NodeProcess) -> None:
    """SIGKILL a node and wait until its app runtime has died with it."""
    runtimes = children_of(node.pid)
    node.signal(signal.SIGKILL)
    wait_until(lambda: not pid_alive(node.pid) and not any(pid_alive(pid) for pid in runtimes), timeout=10)


def test_a_session_survives_the_death_of_its_node(cluster: Cluster):
    # Given ann logged in through the balancer, and kept on her node
    ann, first = cluster.login("ann")
    for _ in range(5):
        assert cluster.whoami(ann) == {"node": first, "user": "ann"}
    other = "b" if first == "a" else "a"
    # When her node is SIGKILLed
    sigkill_node(cluster.nodes[first])
    # Then her very next request is served by the other node, still logged in
    assert cluster.whoami(ann) == {"node": other, "user": "ann"}
    # And she stays there
    for _ in range(5):
        assert cluster.whoami(ann) == {"node": other, "user": "ann"}


def test_disable_drains_and_stop_empties_a_node(cluster: Cluster):
    # Given ann's session on node a
    ann = wait_until(lambda: (found := cluster.login("ann"))[1] == "a" and found[0], timeout=10)
    # When a is disabled
    cluster.ctl("disable", "--node", "a")
    wait_until(lambda: cluster.new_sessions(8) == {"b": 8}, timeout=10, message="new sessions avoid a")
    # Then new sessions go to b, and ann's existing session still reaches a
    assert cluster.new_sessions(10) == {"b": 10}
    for _ in range(10):
        assert cluster.whoami(ann) == {"node": "a", "user": "ann"}
    # When a is stopped
    cluster.ctl("stop", "--node", "a")
    wait_until(lambda: cluster.whoami(ann)["node"] == "b", timeout=10, message="ann moved off a")
    # Then nothing reaches a: ann is on b, still logged in, and so is everyone new
    for _ in range(10):
        assert cluster.whoami(ann) == {"node": "b", "user": "ann"}
    assert cluster.new_sessions(10) == {"b": 10}
    # And enabling it again brings new sessions back
    cluster.ctl("enable")
    wait_until(lambda: "a" in cluster.new_sessions(8), timeout=10)


def test_weights_spread_new_sessions(cluster: Cluster):
    # Given a weighted 80 and b 20
    cluster.ctl("weight", "80", "--node", "a")
    cluster.ctl("weight", "20", "--node", "b")
    wait_until(lambda: _weighted(cluster.new_sessions(20)), timeout=10, message="weights applied")
    # Then new sessions go about four to one
    counts = cluster.new_sessions(100)
    assert counts["a"] > 2 * counts["b"] > 0, counts
    # And weight 0 takes a node out of new sessions
    cluster.ctl("weight", "0", "--node", "b")
    wait_until(lambda: cluster.new_sessions(10) == {"a": 10}, timeout=10)
    shown = json.loads(run_flask(["immutant", "ctl", "show", "--json"], cluster.env).stdout)
    assert {c["node"]: c["weight"] for c in shown} == {"a": 80, "b": 0}


def _weighted(counts: Counter[str]) -> bool:
    return counts["a"] >= 2 * counts["b"]
