"""Contexts (mod_cluster's model): published by ready runtimes, controlled by `ctl`, gone with
their node — on a real store and real nodes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from flask_immutant.contexts import registry
from flask_immutant.keys import Keys

from support import run_flask, wait_until, within

APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension
app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)

@app.get("/")
def index():
    return "hi"
'''


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "ctx_app.py"
    path.write_text(APP)
    return path


def show(env: dict[str, str]) -> list[dict]:  # type: ignore[type-arg]
    result = run_flask(["immutant", "ctl", "show", "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_load_factor_follows_the_busier_of_threads_and_cpu():
    assert registry.load_factor(0, 8, 0.0, 2) == 100
    assert registry.load_factor(4, 8, 0.0, 2) == 50
    assert registry.load_factor(0, 8, 1.5, 2) == 25
    assert registry.load_factor(8, 8, 0.0, 2) == 1  # saturated, but never 0 (0 would mean "off")


def test_the_most_specific_control_wins(store_client, cluster_name):
    keys = Keys(cluster_name)
    for node in ("a", "b"):
        for path in ("/", "/x"):
            registry.publish(store_client, keys, registry.Context(node, path, "app", "127.0.0.1", 1, 90, 1, 0.0), 5)
    registry.set_control(store_client, keys, "DISABLED")  # everything
    registry.set_control(store_client, keys, "STOPPED", node="a", context_path="/x")
    registry.set_control(store_client, keys, "ENABLED", context_path="/")
    registry.set_weight(store_client, keys, 10, node="b")
    states = {(c.node, c.context_path): (c.state, c.weight) for c in registry.contexts(store_client, keys)}
    assert states == {("a", "/"): ("ENABLED", 90), ("a", "/x"): ("STOPPED", 90),
                      ("b", "/"): ("ENABLED", 10), ("b", "/x"): ("DISABLED", 10)}
    # Setting a broader scope overrides what was set inside it
    registry.set_control(store_client, keys, "ENABLED", node="a")
    registry.set_weight(store_client, keys, None)
    states = {(c.node, c.context_path): (c.state, c.weight) for c in registry.contexts(store_client, keys)}
    assert states[("a", "/x")] == ("ENABLED", 90) and states[("b", "/")] == ("ENABLED", 90)
    with pytest.raises(Exception, match="expected one of"):
        registry.set_control(store_client, keys, "PAUSED")


def test_a_ready_runtime_publishes_its_context_and_withdraws_it_on_stop(start_node, app_file, node_env,
                                                                        store_client, cluster_name):
    # Given two nodes serving an app
    a = start_node("--clustered", "--node-name", "a", app=str(app_file))
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", app=str(app_file))
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    # Then each has a context with its address and a load factor
    found = wait_until(lambda: len(show(node_env)) == 2 and show(node_env), timeout=5)
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    assert {(c["node"], c["port"], c["context_path"], c["state"]) for c in found} == {
        ("a", base, "/", "ENABLED"), ("b", base + 100, "/", "ENABLED")}
    assert all(1 <= c["load"] <= 100 for c in found)
    # When ctl disables node a, and stops everything at /
    result = run_flask(["immutant", "ctl", "disable", "--node", "a"], node_env)
    assert result.returncode == 0 and "DISABLED: node a" in result.stdout
    assert {c["node"]: c["state"] for c in show(node_env)} == {"a": "DISABLED", "b": "ENABLED"}
    document = json.loads(run_flask(["immutant", "status", "--json"], node_env).stdout)
    assert document["contexts"][0]["state"] == "DISABLED"
    run_flask(["immutant", "ctl", "stop", "--context", "/"], node_env)
    assert {c["state"] for c in show(node_env)} == {"STOPPED"}
    run_flask(["immutant", "ctl", "enable"], node_env)
    assert {c["state"] for c in show(node_env)} == {"ENABLED"}
    # And a graceful stop withdraws the context at once
    b.signal(signal.SIGTERM)
    started = time.monotonic()
    keys = Keys(cluster_name)
    wait_until(lambda: [c.node for c in registry.contexts(store_client, keys)] == ["a"], timeout=5)
    assert time.monotonic() - started < 1.0  # withdrawn first thing, not expired (TTL 2 s)


def test_a_dead_nodes_context_disappears_within_the_failure_timeout(start_node, app_file, store_client,
                                                                    cluster_name):
    keys = Keys(cluster_name)
    a = start_node("--clustered", "--node-name", "a", app=str(app_file), env={"IMMUTANT_FAILURE_TIMEOUT": "1.0"})
    a.wait_for("joined cluster")
    wait_until(lambda: registry.contexts(store_client, keys), timeout=5)
    a.signal(signal.SIGKILL)
    wait_until(lambda: not registry.contexts(store_client, keys), timeout=within(10))


def test_ctl_mistakes_are_one_line_errors(node_env, embedded_store):
    result = run_flask(["immutant", "ctl", "weight", "lots"], node_env)
    assert result.returncode == 1 and "expected 0-100 or 'auto'" in result.stderr
    result = run_flask(["immutant", "ctl", "weight", "150"], node_env)
    assert result.returncode == 1 and "expected 0-100" in result.stderr
