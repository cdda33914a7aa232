"""Singleton and per-node daemons on real nodes: failover, handover, restarts, the invariant."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from flask_immutant import events, portable
from flask_immutant.cluster.lease import read_holder
from flask_immutant.keys import Keys

from support import run_flask, wait_until, within

APP = '''
import json, os, threading, time
from flask import Flask
from flask_immutant import ImmutantExtension, daemons, get_state

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)
NODE = get_state(app).node_name
LOG = get_state(app).keys.prefix + "test:daemon-log"
stop = threading.Event()

def run():
    stop.clear()
    ctx = daemons.current()
    if NODE in os.environ.get("FAIL_ON", "").split(","):
        raise RuntimeError("broken on " + NODE)
    store = get_state().store
    if os.environ.get("SPIN") == "1":  # always on the CPU: sees a lost lease before its keeper does
        store.rpush(LOG, json.dumps([NODE, ctx.fence, time.time()]))
        while ctx.valid():
            pass
        return
    while not stop.is_set():
        now = time.time()
        if not ctx.valid():
            return
        try:
            store.rpush(LOG, json.dumps([NODE, ctx.fence, now]))
        except Exception:
            pass
        if ctx.wait(0.05):
            return

daemons.start("worker", run, stop.set, singleton=os.environ.get("SINGLETON", "1") == "1", app=app)
'''


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "daemon_app.py"
    path.write_text(APP)
    return path


@pytest.fixture
def keys(cluster_name: str) -> Keys:
    return Keys(cluster_name)


def holder(store: redis.Redis, keys: Keys) -> Any:
    return read_holder(store, keys, "daemon:worker")


def log_entries(store: redis.Redis, keys: Keys) -> list[tuple[str, int | None, float]]:
    return [tuple(json.loads(raw)) for raw in store.lrange(keys.prefix + "test:daemon-log", 0, -1)]  # type: ignore[misc]


def start_two(start_node, app_file, env=None):
    a = start_node("--clustered", "--node-name", "a", app=str(app_file), env=env)
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", app=str(app_file), env=env)
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    return {"a": a, "b": b}


def test_a_singleton_runs_on_exactly_one_node_and_fails_over_after_sigkill(start_node, app_file, store_client, keys):
    nodes = start_two(start_node, app_file)
    first = wait_until(lambda: holder(store_client, keys), timeout=10)
    time.sleep(1.0)  # both runtimes contend meanwhile; only one may run
    assert {entry[0] for entry in log_entries(store_client, keys)} == {first.node}
    # When the holder node is killed
    nodes[first.node].signal(signal.SIGKILL)
    survivor = "b" if first.node == "a" else "a"
    # Then the daemon runs on the other node within the failure timeout plus a small margin
    second = wait_until(lambda: (h := holder(store_client, keys)) and h.node == survivor and h,
                        timeout=within(10))
    assert second.fence > first.fence
    wait_until(lambda: log_entries(store_client, keys)[-1][0] == survivor, timeout=2)


def test_graceful_stop_hands_the_singleton_over_at_once(start_node, app_file, store_client, keys):
    nodes = start_two(start_node, app_file)
    first = wait_until(lambda: holder(store_client, keys), timeout=10)
    survivor = "b" if first.node == "a" else "a"
    nodes[first.node].signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_until(lambda: (h := holder(store_client, keys)) and h.node == survivor, timeout=2)
    assert time.monotonic() - stopped < 1.5  # released, not expired (the TTL is 2 s)
    assert nodes[first.node].wait(15) == 0


def test_a_per_node_daemon_runs_on_every_node(start_node, app_file, store_client, keys):
    start_two(start_node, app_file, env={"SINGLETON": "0"})
    wait_until(lambda: {e[0] for e in log_entries(store_client, keys)} == {"a", "b"}, timeout=10)
    assert {e[1] for e in log_entries(store_client, keys)} == {None}


def test_a_daemon_failing_on_one_node_moves_to_another(start_node, app_file, store_client, keys, node_env):
    # Given a daemon that always fails on node "a" (start "a" first so it takes the lease)
    env = {"FAIL_ON": "a"}
    a = start_node("--clustered", "--node-name", "a", app=str(app_file), env=env)
    a.wait_for("daemon worker failed", timeout=15)
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", app=str(app_file), env=env)
    b.wait_for("joined cluster")
    # Then after repeated failures "a" steps aside and "b" runs it
    wait_until(lambda: (h := holder(store_client, keys)) and h.node == "b", timeout=20)
    wait_until(lambda: log_entries(store_client, keys), timeout=5)
    result = run_flask(["immutant", "daemons", "--json"], node_env)
    (entry,) = json.loads(result.stdout)
    assert entry["name"] == "worker" and entry["singleton"] and entry["node"] == "b"
    assert entry["fencing_token"] is not None


def test_status_json_has_a_daemons_section(start_node, app_file, store_client, keys, node_env):
    start_two(start_node, app_file)
    current = wait_until(lambda: holder(store_client, keys), timeout=10)
    document = json.loads(run_flask(["immutant", "status", "--json"], node_env).stdout)
    (entry,) = document["daemons"]
    assert entry["node"] == current.node and entry["fencing_token"] == current.fence
    assert entry["state"] == "running" and entry["restarts"] == 0


def intervals(entries: list[tuple[str, int | None, float]]) -> list[tuple[int, str, float, float]]:
    """(fence, node, first time, last time) per holding, in fence order."""
    found: dict[int, tuple[str, float, float]] = {}
    for node, fence, at in entries:
        assert fence is not None
        if fence in found:
            n, lo, hi = found[fence]
            assert n == node, f"token {fence} used by two nodes"
            found[fence] = (n, min(lo, at), max(hi, at))
        else:
            found[fence] = (node, at, at)
    return [(fence, *found[fence]) for fence in sorted(found)]


def test_no_two_holders_ever_overlap(start_node, app_file, store_client, keys, embedded_store):
    # Given two nodes running a singleton that logs (node, token, time) every 50 ms
    nodes = start_two(start_node, app_file)
    wait_until(lambda: holder(store_client, keys), timeout=10)

    def restart(name: str) -> None:
        offset = "0" if name == "a" else "100"
        nodes[name] = start_node("--clustered", "--node-name", name, "--port-offset", offset, app=str(app_file))
        nodes[name].wait_for("joined cluster")

    # When the holder is SIGKILLed, twice, and restarted each time
    for _ in range(2):
        current = wait_until(lambda: holder(store_client, keys), timeout=10)
        nodes[current.node].signal(signal.SIGKILL)
        nodes[current.node].wait()
        gone = current.node
        wait_until(lambda: (h := holder(store_client, keys)) and h.node != gone, timeout=5)  # noqa: B023
        restart(gone)
    # And the holder's runtime is frozen (SIGSTOP) past its lease, then thawed
    current = wait_until(lambda: holder(store_client, keys), timeout=10)
    os.kill(current.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: (h := holder(store_client, keys)) and h.node != current.node, timeout=6)
        time.sleep(0.5)
    finally:
        os.kill(current.pid, signal.SIGCONT)
    # And the store itself stops answering for longer than the TTL
    time.sleep(1.0)
    store_pid = embedded_store.pid()
    assert store_pid
    os.kill(store_pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)
    finally:
        os.kill(store_pid, signal.SIGCONT)
    wait_until(lambda: holder(store_client, keys), timeout=10)
    time.sleep(1.0)
    # Then the logged holdings never overlap in time and tokens only increase
    held = intervals(log_entries(store_client, keys))
    assert len(held) >= 4
    for before, after in itertools.pairwise(held):
        assert before[3] < after[2], f"holding {before} overlaps {after}"


def test_the_record_belongs_to_the_current_holder_after_a_frozen_holder_resumes(start_node, app_file, store_client,
                                                                                  keys, node_env):
    # Given two nodes, the holder's runtime frozen (SIGSTOP) past its lease until the other takes over
    nodes = start_two(start_node, app_file, env={"SPIN": "1"})
    first = wait_until(lambda: holder(store_client, keys), timeout=10)
    survivor = "b" if first.node == "a" else "a"
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = wait_until(lambda: (h := holder(store_client, keys)) and h.node == survivor and h, timeout=10)
    finally:
        os.kill(first.pid, signal.SIGCONT)  # When it resumes, its daemon finds its lease gone and returns
    nodes[first.node].wait_for("lease daemon:worker: ", timeout=10)
    wait_until(lambda: log_entries(store_client, keys)[-1][0] == survivor, timeout=5)
    time.sleep(0.5)
    # Then the record shows the new holder's run: no restart, no error, its token and start
    (entry,) = json.loads(run_flask(["immutant", "daemons", "--json"], node_env).stdout)
    assert (entry["node"], entry["fencing_token"], entry["since"]) == (survivor, second.fence, second.since)
    assert (entry["state"], entry["restarts"], entry["last_error"]) == ("running", 0, None)
    raw = json.loads(store_client.hget(keys.daemons, "worker"))
    assert (raw["node"], raw["fencing_token"], raw["last_error"]) == (survivor, second.fence, None)
    # And the resumed node does not take the return for a crash
    assert "returned while it should run" not in nodes[first.node].output


def test_a_new_holder_acts_while_the_store_client_for_its_record_hangs(embedded_store, keys, tmp_path):
    # Given a store client that hangs (its server frozen, the way a primary lost in a partition
    # leaves a client waiting), next to a lease manager on a store that answers
    import subprocess
    import threading

    from flask import Flask

    from flask_immutant.cluster.lease import LeaseManager
    from flask_immutant.daemons.runner import DaemonRunner, DaemonSpec
    from flask_immutant.store.embedded import redis_server_binary

    from support import free_port_base

    port = free_port_base(0)
    frozen = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stuck = redis.Redis(port=port, socket_timeout=None)
    leases = LeaseManager(embedded_store.url, keys, "n1", ttl=2.0)
    started, stopped = threading.Event(), threading.Event()
    runner = None
    try:
        wait_until(lambda: _pings(stuck), timeout=10, message="the second redis-server answers")
        os.kill(frozen.pid, signal.SIGSTOP)
        spec = DaemonSpec("hung-record", lambda: started.set() or stopped.wait(30), stopped.set, singleton=True)
        runner = DaemonRunner(spec, Flask(__name__), "n1", keys, stuck, leases, "daemon:hung-record")
        # When it acquires the daemon's lease
        runner.activate()
        # Then the daemon runs at once, without waiting for its status record to be written
        wait_until(started.is_set, timeout=within(5), message="the daemon started while its record hangs")
    finally:
        stopped.set()
        os.kill(frozen.pid, signal.SIGCONT)
        frozen.kill()
        frozen.wait()
        if runner is not None:
            runner.shutdown()
        leases.close()
        stuck.close()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def lease_expiry(store: redis.Redis, keys: Keys) -> float:
    """When the daemon's lease key expires if nobody renews it (wall clock, this machine)."""
    return time.time() + store.pttl(keys.lease("daemon:worker")) / 1000


@pytest.mark.skipif(not portable.linux_extras(), reason="a death is proven by a lock file in Linux's /dev/shm only")
def test_a_sigkilled_holder_is_replaced_from_its_host_before_its_lease_expires(start_node, app_file, store_client,
                                                                                keys):
    # Given two nodes of one machine and a failure timeout far longer than such a failover takes
    nodes = start_two(start_node, app_file, env={"IMMUTANT_FAILURE_TIMEOUT": "20"})
    first = wait_until(lambda: holder(store_client, keys), timeout=10)
    survivor = "b" if first.node == "a" else "a"
    expires = lease_expiry(store_client, keys)  # at least this late: renewals only push it back
    # When the holder's node is SIGKILLed (its runtime dies with it)
    nodes[first.node].signal(signal.SIGKILL)
    # Then the other node, which can prove the holder dead, holds the lease before its key could expire
    second = wait_until(lambda: (h := holder(store_client, keys)) and h.node == survivor and h, timeout=30)
    assert second.since < expires and second.fence > first.fence
    # And the takeover is reported as a failover from the dead node
    acquired = wait_until(lambda: [e for e in events.read(store_client, keys) if e.kind == "lease.acquired"
                                   and e.fields["lease"] == "daemon:worker" and e.node == survivor], timeout=5)
    assert acquired[-1].fields["failover"] is True and acquired[-1].fields["previous_node"] == first.node
    wait_until(lambda: log_entries(store_client, keys)[-1][0] == survivor, timeout=5)


def test_a_stopped_holder_is_not_displaced_while_its_lease_lives(start_node, app_file, store_client, keys):
    # Given two nodes of one machine, the holder's runtime frozen (SIGSTOP: alive, and it runs its
    # stop rule when it resumes)
    nodes = start_two(start_node, app_file)
    first = wait_until(lambda: holder(store_client, keys), timeout=10)
    survivor = "b" if first.node == "a" else "a"
    releases = store_client.pubsub()  # a release (the holder's, or on its behalf) is published; an expiry is not
    releases.subscribe(keys.lease_released)
    try:
        wait_until(lambda: releases.get_message(timeout=0.1), timeout=5)  # the subscription is live
        os.kill(first.pid, signal.SIGSTOP)
        wait_until(lambda: portable.process_state(first.pid) in ("T", None), timeout=5)
        # Then the other node takes over only once the frozen holder's key expired: nobody released it
        second = wait_until(lambda: (h := holder(store_client, keys)) and h.node == survivor and h, timeout=10)
        assert second.fence > first.fence
        published = []
        while (message := releases.get_message(timeout=0.1)) is not None:
            published.append(message["data"])
        assert b"daemon:worker" not in published
        assert not any("released on behalf" in node.output for node in nodes.values())
    finally:
        os.kill(first.pid, signal.SIGCONT)
        releases.close()


@pytest.mark.skipif(not portable.linux_extras(), reason="a death is proven by a lock file in Linux's /dev/shm only")
def test_a_node_releases_the_leases_of_its_crashed_runtime_for_other_hosts(start_node, app_file, store_client,
                                                                            keys):
    # Given the holder on node "a", and a contender on node "b" that can prove nothing about "a"'s
    # processes (portable mode: as if on another host)
    env = {"IMMUTANT_FAILURE_TIMEOUT": "20"}
    a = start_node("--clustered", "--node-name", "a", app=str(app_file), env=env)
    first = wait_until(lambda: (h := holder(store_client, keys)) and h.node == "a" and h, timeout=15)
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", app=str(app_file),
                   env={**env, portable.PORTABLE_ENV: "1"})
    b.wait_for("serves on", timeout=30)  # its runtime is up: its daemon contends
    expires = lease_expiry(store_client, keys)
    # When "a"'s runtime alone is SIGKILLed (its node lives, and restarts it after a backoff)
    os.kill(first.pid, signal.SIGKILL)
    # Then "a" releases the dead runtime's lease (its sweep, not its restarted runtime: that one
    # proves the death later) and a contender takes over before the key could expire: "b" as a
    # rule, "a"'s restarted runtime when it wins the race for the released lease (1 run in 8)
    second = wait_until(lambda: (h := holder(store_client, keys)) and h.pid != first.pid and h, timeout=30)
    assert second.node in ("a", "b") and second.since < expires
    a.wait_for("released the leases of a crashed runtime: .*daemon:worker")
