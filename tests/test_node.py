"""Nodes as real processes: forming a cluster, identity, collisions, supervision, shutdown."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_immutant import portable
from flask_immutant.cluster import Membership, NodeIdentity, membership
from flask_immutant.contexts import registry
from flask_immutant.errors import NodeStartError
from flask_immutant.keys import Keys

from support import pid_alive, run_flask, runtimes_of, wait_until, within

APP = '''
import sys
from flask import Flask
from flask_immutant import ImmutantExtension

app = Flask(__name__)
ImmutantExtension(app)

@app.get("/")
def index():
    print("handled a request", flush=True)
    return "hello"

@app.get("/gc")
def collector():
    import gc
    return {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()}
'''


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "hello_app.py"
    path.write_text(APP)
    return path


def members(env: dict[str, str]) -> list[dict[str, Any]]:
    result = run_flask(["immutant", "status", "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["members"]  # type: ignore[no-any-return]


def names(env: dict[str, str]) -> set[str]:
    return {m["name"] for m in members(env)}


def http_get(port: int, host: str = "127.0.0.1") -> requests.Response | None:
    try:
        return requests.get(f"http://{host}:{port}/", timeout=5)
    except requests.RequestException:  # refused, or a runtime still starting on a loaded machine
        return None


def test_two_nodes_in_different_folders_form_one_cluster(start_node, node_env, tmp_path):
    # Given two shells in different folders, both with the default (per-user) home
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # When each starts a clustered node, the second with a port offset
    first = start_node("--clustered", cwd=tmp_path / "a")
    second = start_node("--clustered", "--port-offset", "100", cwd=tmp_path / "b")
    first.wait_for("joined cluster")
    second.wait_for("joined cluster")
    # Then status shows both within 2 s, with distinct names, ports and data dirs
    seen = wait_until(lambda: len(members(node_env)) == 2 and members(node_env), timeout=2)
    assert len({m["name"] for m in seen}) == 2
    assert len({m["data_dir"] for m in seen}) == 2
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    assert sorted(m["ports"]["http"] for m in seen) == [base, base + 100]
    assert all(m["clustered"] for m in seen)


def test_first_output_line_is_the_effective_configuration(start_node, node_env):
    node = start_node("--clustered", "--port-offset", "100")
    node.wait_for("joined cluster")
    banner = node.lines[0]
    assert banner.startswith("flask-immutant node ")
    for fragment in (f"cluster={node_env['IMMUTANT_CLUSTER']}", f"http={int(node_env['IMMUTANT_HTTP_PORT']) + 100}",
                     "offset=100", f"data={node_env['IMMUTANT_HOME']}/nodes/", "store=unix://", "clustered=yes"):
        assert fragment in banner


def test_a_second_node_with_the_same_name_refuses_to_start(start_node, node_env):
    first = start_node("--clustered", "--node-name", "twin")
    first.wait_for("joined cluster")
    second = start_node("--clustered", "--node-name", "twin", "--port-offset", "100")
    assert second.wait() == 1
    assert "node name 'twin' is already used by a running node" in second.output
    assert "Traceback" not in second.output
    assert names(node_env) == {"twin"}


def test_a_busy_port_without_an_offset_suggests_one(start_node):
    first = start_node("--clustered")
    first.wait_for("joined cluster")
    second = start_node("--clustered", "--node-name", "other")
    assert second.wait() == 1
    assert "already in use" in second.output and "--port-offset 100" in second.output
    assert "Traceback" not in second.output


def test_a_node_serves_its_app_and_the_app_output_appears_in_the_node_output(start_node, app_file, node_env):
    node = start_node("--clustered", app=str(app_file))
    node.wait_for("joined cluster")
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    response = wait_until(lambda: http_get(port), timeout=10)
    assert response.text == "hello"
    node.wait_for("handled a request", timeout=5)


def test_a_serving_runtime_collects_garbage_as_usual_with_its_start_up_frozen(start_node, app_file, node_env):
    """Start-up raises the collector's threshold (``startup.py``); a runtime left with it would
    keep far more garbage than Python's usual, for as long as it serves."""
    import gc

    node = start_node("--clustered", app=str(app_file))
    node.wait_for("joined cluster")
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    wait_until(lambda: http_get(port), timeout=10)
    answer = requests.get(f"http://127.0.0.1:{port}/gc", timeout=5).json()
    assert answer["threshold"] == list(gc.get_threshold())  # this test process has CPython's defaults
    assert answer["frozen"] > 10_000  # Flask, the package and the app: no collection scans them again


def test_sigkill_of_the_supervisor_takes_its_app_runtime_along(start_node, app_file, node_env):
    # Given a node serving an app from a child runtime
    node = start_node("--clustered", app=str(app_file))
    node.wait_for("joined cluster")
    runtime_pids = wait_until(lambda: runtimes_of(node.pid), timeout=5)
    # When the supervisor is killed with SIGKILL
    node.signal(signal.SIGKILL)
    # Then its children die with it and nothing serves the port any more
    wait_until(lambda: not any(pid_alive(pid) for pid in runtime_pids), timeout=within(5))
    assert http_get(int(node_env["IMMUTANT_HTTP_PORT"])) is None


def test_a_crashed_app_runtime_is_restarted(start_node, app_file, node_env):
    node = start_node("--clustered", app=str(app_file))
    node.wait_for("joined cluster")
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    (runtime,) = wait_until(lambda: runtimes_of(node.pid), timeout=5)
    # When the runtime dies
    import os

    os.kill(runtime, signal.SIGKILL)
    # Then the supervisor starts a new one that serves again
    node.wait_for("restarting in", timeout=5)
    new = wait_until(lambda: [p for p in runtimes_of(node.pid) if p != runtime], timeout=10)
    assert new
    assert wait_until(lambda: http_get(port), timeout=10).text == "hello"


def test_graceful_stop_is_bounded_and_seen_at_once_by_the_other_node(start_node, app_file, node_env):
    stays = start_node("--clustered", "--node-name", "stays")
    goes = start_node("--clustered", "--node-name", "goes", "--port-offset", "100", app=str(app_file))
    stays.wait_for("joined cluster")
    goes.wait_for("joined cluster")
    stays.wait_for("member joined: goes")
    # When one node is stopped with SIGTERM
    goes.signal(signal.SIGTERM)
    assert goes.wait(timeout=15) == 0
    # Then it stopped well within the shutdown timeout and the other saw it leave, not time out
    stays.wait_for(r"member left: goes \(left\)", timeout=within(5))
    assert names(node_env) == {"stays"}


HANGING_APP = '''
import threading
from flask import Flask
from flask_immutant import ImmutantExtension

app = Flask(__name__)
ImmutantExtension(app)

@app.get("/hang")
def hang():
    print("a request that never ends began", flush=True)
    threading.Event().wait()
'''


def test_a_drain_that_runs_out_of_time_still_ends_in_the_runtimes_own_exit(start_node, node_env, tmp_path):
    """The supervisor kills a runtime at the shutdown timeout counted from its SIGTERM; the
    runtime's drain, counted from when it handled that SIGTERM, was as long: a drain held to its
    deadline was SIGKILLed before it could close its leases, log and exit."""
    app = tmp_path / "hanging_app.py"
    app.write_text(HANGING_APP)
    node = start_node("--clustered", app=str(app), env={"IMMUTANT_SHUTDOWN_TIMEOUT": "2"})
    node.wait_for("serves on http")
    # Given a request in progress that never ends
    client = socket.create_connection(("127.0.0.1", int(node_env["IMMUTANT_HTTP_PORT"])), timeout=30)
    try:
        client.sendall(b"GET /hang HTTP/1.1\r\nHost: node\r\n\r\n")
        node.wait_for("a request that never ends began")
        # When the node gets SIGTERM
        node.signal(signal.SIGTERM)
        # Then the runtime gives up its drain, says so and exits by itself: it is not killed
        assert node.wait(timeout=within(15)) == 0
    finally:
        client.close()
    assert "did not stop in time; killing it" not in node.output
    assert "the drain ran out of time with 1 connection(s) still open" in node.output


def test_sigint_stops_a_node_too(start_node):
    node = start_node("--clustered")
    node.wait_for("joined cluster")
    node.signal(signal.SIGINT)
    assert node.wait(timeout=15) == 0


def test_a_crashed_node_leaves_after_the_failure_timeout(start_node, node_env):
    env = {"IMMUTANT_FAILURE_TIMEOUT": "1.0"}
    stays = start_node("--clustered", "--node-name", "stays", env=env)
    dies = start_node("--clustered", "--node-name", "dies", "--port-offset", "100", env=env)
    stays.wait_for("member joined: dies")
    dies.signal(signal.SIGKILL)
    stays.wait_for(r"member left: dies \(timeout\)", timeout=within(10))
    assert names({**node_env, **env}) == {"stays"}


def test_a_killed_node_restarted_at_once_rejoins_under_its_name(start_node, node_env):
    # The kill leaves its claim alive for the failure timeout; a restart on the same host must
    # not have to wait for it (the walkthrough restarts the killed node straight away).
    first = start_node("--clustered", "--node-name", "phoenix", env={"IMMUTANT_FAILURE_TIMEOUT": "30"})
    first.wait_for("joined cluster")
    first.signal(signal.SIGKILL)
    first.wait()
    again = start_node("--clustered", "--node-name", "phoenix", env={"IMMUTANT_FAILURE_TIMEOUT": "30"})
    again.wait_for("joined cluster", timeout=10)
    assert names({**node_env, "IMMUTANT_FAILURE_TIMEOUT": "30"}) == {"phoenix"}
    # And the cluster's event log has the crash, before the join (nobody else could reap it)
    events = json.loads(run_flask(["immutant", "events", "--json"], node_env).stdout)
    assert [(e["kind"], e["fields"].get("reason")) for e in events if e["fields"].get("member") == "phoenix"] == [
        ("member.joined", None), ("member.left", "timeout"), ("member.joined", None)]


def test_a_name_claimed_from_a_container_with_our_host_name_is_not_taken_over(start_node, node_env, store_client,
                                                                               cluster_name):
    # Given the name "twin" claimed by a live node of another container on this machine: the same
    # host name, a pid of its own pid namespace (none here), and its lock file in its own /dev/shm
    # (or, sharing our /dev/shm, a lock file nobody holds: its own code may have closed it)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    claim = Keys(cluster_name).member_claim("twin")
    free = portable.LOCK_DIR / f"flask-immutant-{uuid.uuid4().hex}.lock"
    free.write_bytes(b"")
    free.chmod(0o600)
    try:
        for token in (f"{socket.gethostname()}|{gone.pid}|{uuid.uuid4().hex}",
                      f"{socket.gethostname()}|{gone.pid}|{uuid.uuid4().hex}|flask-immutant-{uuid.uuid4().hex}.lock",
                      f"{socket.gethostname()}|{gone.pid}|{uuid.uuid4().hex}|flask-immutant-{uuid.uuid4().hex}.lock|"
                      f"{portable.pid_namespace()}",
                      f"{socket.gethostname()}|{gone.pid}|{uuid.uuid4().hex}|{free.name}",
                      f"{socket.gethostname()}|{gone.pid}|{uuid.uuid4().hex}|{free.name}|0:1"):
            store_client.set(claim, token, px=60_000)
            # When a node starts under that name here
            node = start_node("--clustered", "--node-name", "twin")
            # Then it refuses: nothing proves the other node dead
            assert node.wait() == 1
            assert "node name 'twin' is already used by a running node" in node.output
            assert store_client.get(claim) == token.encode()
    finally:
        free.unlink(missing_ok=True)


def test_an_app_that_cannot_be_found_is_one_line_error(start_node):
    node = start_node("--clustered", app="no_such_module_here")
    assert node.wait() != 0
    assert "Error:" in node.output and "Traceback" not in node.output


def test_a_non_clustered_node_says_so(start_node, node_env):
    node = start_node()
    node.wait_for("joined cluster")
    assert "clustered=no" in node.lines[0]
    assert [m["clustered"] for m in members(node_env)] == [False]


def test_port_offset_moves_the_http_port(start_node, app_file, node_env):
    node = start_node("--clustered", "--port-offset", "200", app=str(app_file))
    node.wait_for("joined cluster")
    port = int(node_env["IMMUTANT_HTTP_PORT"]) + 200
    assert wait_until(lambda: http_get(port), timeout=10).status_code == 200
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(node_env["IMMUTANT_HTTP_PORT"]))) != 0


def test_a_wildcard_bind_without_an_advertised_address_is_a_one_line_error(start_node):
    node = start_node("--host", "0.0.0.0")
    assert node.wait(20) != 0
    errors = [line for line in node.lines if line.startswith("Error:")]
    assert len(errors) == 1 and "IMMUTANT_ADVERTISE_HOST" in errors[0], node.output
    assert "Traceback" not in node.output


def test_a_node_advertises_the_address_it_is_told_to(start_node, app_file, node_env, store_client, cluster_name):
    # Given a node bound to every interface, told to advertise another loopback address
    node = start_node("--clustered", "--host", "0.0.0.0", "--advertise-host", "127.0.0.2", app=str(app_file))
    node.wait_for("joined cluster")
    # Then membership and its context (which both balancers route by) carry that address
    assert [m["address"] for m in members(node_env)] == ["127.0.0.2"]
    (context,) = wait_until(lambda: registry.contexts(store_client, Keys(cluster_name)), timeout=10)
    assert context.host == "127.0.0.2"
    # And the node answers there
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    assert wait_until(lambda: http_get(port, host="127.0.0.2"), timeout=10).text == "hello"


def test_two_nodes_taking_over_one_dead_name_at_once_cannot_both_join(store_client, cluster_name, tmp_path,
                                                                      monkeypatch):
    # Given the name "phoenix" claimed by a node proven dead, and two nodes starting under it
    keys = Keys(cluster_name)
    dead = f"{socket.gethostname()}|1|{uuid.uuid4().hex}|-|-"
    store_client.set(keys.member_claim("phoenix"), dead, px=60_000)
    monkeypatch.setattr(membership, "_holder_is_dead_here", lambda token: token == dead)
    identity = NodeIdentity(name="phoenix", host="127.0.0.1", port_offset=0, ports={"http": 1},
                            data_dir=tmp_path, clustered=True, address="127.0.0.1")
    first, second = (Membership(store_client, keys, identity, 30.0) for _ in range(2))
    claim = second._scripts["claim"]

    def first_claims_between(**kwargs: object) -> object:  # the second's proof and its takeover
        reply = claim(**kwargs)
        if kwargs["args"][4] == "":  # type: ignore[index]
            first.join()
        return reply

    second._scripts["claim"] = first_claims_between
    try:
        # When both prove the predecessor dead and take the name over, the first one first
        # Then only the first joins: the second is refused
        with pytest.raises(NodeStartError, match="already used by a running node"):
            second.join()
        assert store_client.get(keys.member_claim("phoenix")) == first.token.encode()
    finally:
        for node in (first, second):
            node.leave()


def test_a_hostile_claim_token_proves_nothing_and_never_raises() -> None:
    # Given claim tokens a store writer could leave: a pid in another digit script, one past any
    # int a kill takes, a host name holding "|", too few fields
    ns = portable.pid_namespace() or "-"
    lock = f"flask-immutant-{uuid.uuid4().hex}.lock"
    tokens = [f"h|\u00b2|n|{lock}|{ns}", f"h|{'9' * 30}|n|{lock}|{ns}", f"a|b|1|n|{lock}|{ns}", "h|1|n", "", "|||||"]
    # Then none of them proves a predecessor dead (no file, no such pid), and none raises
    assert [membership._holder_is_dead_here(token) for token in tokens] == [False] * len(tokens)
