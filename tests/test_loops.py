"""No background loop dies: every long-running thread is a ``loops.Loop`` that survives any
exception, logs it once, backs off, and reports its health in ``flask immutant status``.

The real-process test loads ``tests/plugins/fault_injector.py`` into a node, its app runtime and
an embedded balancer, makes every loop of each raise, and watches status, logs and the work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from balancer_support import start_embedded

from flask_immutant.keys import Keys
from flask_immutant.loops import UNHEALTHY_AFTER, Loop, backoff_delay, read_health
from flask_immutant.store.connect import Subscription

from support import run_flask, wait_until

PLUGINS_DIR = Path(__file__).parent / "plugins"

# --- the helper, in-process ------------------------------------------------------------------


def test_a_step_that_raises_is_logged_once_counted_and_survived(caplog: pytest.LogCaptureFixture) -> None:
    # Given a loop whose step raises an unexpected error five times, then works
    calls: list[int] = []
    done = threading.Event()

    def step() -> float:
        calls.append(1)
        if len(calls) <= 5:
            raise KeyError("garbage")
        done.set()
        return 0.01

    caplog.set_level(logging.DEBUG, logger="flask_immutant.loops")
    loop = Loop("test-loop", step, 0.001).start()
    try:
        # Then it carries on past the failures and recovers
        assert done.wait(10)
        health = wait_until(lambda: loop.health.last_success and loop.health, timeout=5)
        assert health.failures == 5 and health.consecutive_failures == 0 and health.healthy
        assert health.last_error == "KeyError: 'garbage'" and health.last_success is not None
    finally:
        loop.stop()
    # And the error was logged once with its traceback, the repeats only counted, the recovery said
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "test-loop" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert any("recovered after 5 failed step(s)" in r.getMessage() for r in caplog.records)
    assert loop.current_health().state == "stopped"


def test_a_loop_failing_in_a_row_is_unhealthy_and_backs_off() -> None:
    failing = threading.Event()
    failing.set()

    def step() -> None:
        if failing.is_set():
            raise RuntimeError("store garbage")

    loop = Loop("flaky", step, 0.01).start()
    try:
        wait_until(lambda: loop.health.consecutive_failures >= UNHEALTHY_AFTER, timeout=10)
        assert not loop.health.healthy and loop.health.state == "failing"
        assert loop.alive
        failing.clear()
        wait_until(lambda: loop.health.healthy and loop.health.last_success, timeout=10)
    finally:
        loop.stop()
    # One backoff policy: doubling from the interval, capped (and a loop's own cap for cadences)
    assert [backoff_delay(n, 0.5) for n in (1, 2, 3, 5, 50)] == [0.5, 1.0, 2.0, 5.0, 5.0]
    assert backoff_delay(10, 0.75, cap=0.75) == 0.75


def test_stop_interrupts_a_step_waiting_on_its_subscription(store_client, cluster_name) -> None:
    """Regression: a loop waiting for a pub/sub message (membership's watcher, the lease listener,
    the deployer) was stopped only once its read timed out: up to 0.25 s per loop on a node's stop
    path, every time. The wait here is an hour; pytest-timeout fails a stop that waits it out."""
    # Given a loop whose step waits an hour for a message that never comes
    subscription = Subscription(store_client, f"{cluster_name}.quiet")
    answers: list[object] = []

    def step() -> float:
        answers.append(subscription.get_message(timeout=3600))
        return 0.0

    loop = Loop("quiet-listener", step, 0.0, on_error=subscription.drop, interrupt=subscription.interrupt).start()
    waiting = wait_until(lambda: _blocked_in(f"immutant-{loop.name}", "_wait_readable"), timeout=10)
    # When it is stopped, with no bound on the wait for its step
    loop.stop(timeout=None)
    subscription.drop()
    # Then the step's wait ended without a message, and the loop ended cleanly
    assert waiting and answers == [None]
    assert not loop.alive and loop.current_health().state == "stopped"


def test_a_subscription_on_a_descriptor_above_1023_waits_rather_than_spins(store_client, cluster_name) -> None:
    """Regression: the wait used select(), which refuses descriptors above 1023; the error read as
    "readable", so a loop in a process holding many connections (a balancer) spun a CPU for the
    whole wait. The wait must say "nothing to read" when nothing came."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard descriptor limit ({hard}) is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(max(0, 1100 - len(os.listdir("/proc/self/fd"))))]
    subscription = Subscription(store_client, f"{cluster_name}.quiet")
    try:
        pubsub = subscription.open()
        assert pubsub.connection._sock.fileno() > 1023
        assert subscription.get_message(timeout=0.5) is None  # reads the (ignored) subscribe confirmation
        # When nothing is published, a wait ends with nothing, not at once with "readable"
        assert Subscription._wait_readable(pubsub, 0.2) is False
        store_client.publish(f"{cluster_name}.quiet", "hello")
        assert subscription.get_message(timeout=5)["data"] == b"hello"
    finally:
        subscription.drop()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _blocked_in(thread_name: str, function: str) -> bool:
    """Whether the thread named ``thread_name`` is inside ``function`` now."""
    import sys

    for thread in threading.enumerate():
        frame = sys._current_frames().get(thread.ident or 0) if thread.name == thread_name else None
        while frame is not None:
            if frame.f_code.co_name == function:
                return True
            frame = frame.f_back
    return False


# --- every loop of real processes ------------------------------------------------------------

APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension, caching, daemons, get_state, jobs, messaging

app = Flask(__name__)
app.config.update(IMMUTANT_CLUSTERED=True, IMMUTANT_CACHE=True)
ImmutantExtension(app)
messaging.start("/queue/work", app=app)

@messaging.listen("/queue/work", app=app)
def work(n):
    get_state().store.rpush(get_state().keys.prefix + "test:received", n)

def tick():
    get_state().store.incr(get_state().keys.prefix + "test:ticks")

jobs.schedule("tick", tick, every=0.5, app=app)

def keeper():
    ctx = daemons.current()
    while not ctx.wait(0.2):
        get_state().store.set(get_state().keys.prefix + "test:daemon", "alive")

daemons.start("keeper", keeper, app=app)

@app.get("/")
def index():
    near = caching.cache("near", mode="invalidated")
    near.tracking()
    return {"tracking": near.get("x") is None}

@app.post("/publish/<int:n>")
def publish(n):
    messaging.publish("/queue/work", n)
    return {"published": n}
'''

NODE_LOOPS = {"heartbeat", "membership", "deployer", "deploy-folder", "idle-http"}
RUNTIME_LOOPS = {"lease-wakeup", "lease-daemon:keeper", "scheduler", "mq-heartbeat", "mq-reaper", "context",
                 "cache-near"}
BALANCER_LOOPS = {"balancer-table", "balancer-events"}


def _loops(store_client: Any, cluster: str) -> list[dict[str, Any]]:
    return [{**h, "role": p["role"], "node": p["node"]}
            for p in read_health(store_client, Keys(cluster)) for h in p["loops"]]


def _by_role(loops: list[dict[str, Any]], role_prefix: str) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in loops if h["role"].startswith(role_prefix)}


def test_every_loop_survives_an_injected_exception_and_shows_it_in_status(
        start_node, node_env, tmp_path, store_client, cluster_name):
    faults = tmp_path / "faults.json"
    env = {**node_env, "IMMUTANT_PLUGINS": "fault_injector", "FAULTS_FILE": str(faults),
           "IMMUTANT_FAILURE_TIMEOUT": "6",
           "PYTHONPATH": os.pathsep.join([str(PLUGINS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # Given a node running a deployed app (daemon, job, listener, near cache) and a balancer
    node = start_node("--clustered", "--node-name", "a", env=env)
    node.wait_for("joined cluster")
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    deployed = run_flask(["immutant", "deploy", "--name", "busy"], env, cwd=folder)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).json() == {"tracking": True}
    balancer, _url = start_embedded(env, tmp_path)
    try:
        prefix = Keys(cluster_name).prefix
        wait_until(lambda: store_client.get(prefix + "test:ticks"), timeout=10, message="the job ticks")
        wait_until(lambda: {h["name"] for h in _loops(store_client, cluster_name)}
                   >= NODE_LOOPS | RUNTIME_LOOPS | BALANCER_LOOPS, timeout=15, message="every loop reports")

        # When one loop of the node keeps failing: the node is reported unhealthy, naming it
        faults.write_text(json.dumps(["deployer"]))
        status = wait_until(lambda: _unhealthy_member(env), timeout=15, message="member a unhealthy")
        assert status["failing_loops"] == ["node/deployer"]
        text = run_flask(["immutant", "status"], env)
        assert "UNHEALTHY: node/deployer failing" in text.stdout and "1 FAILING" in text.stdout, text.stdout

        # When every loop of every process raises on every step (a step that runs for good, the
        # near cache's tracking connection, ends when the store drops its subscribers)
        faults.write_text(json.dumps(["*"]))
        store_client.client_kill_filter(_type="pubsub")

        def not_failing_yet() -> list[str]:
            loops = _loops(store_client, cluster_name)
            missing = []
            for role, names in (("node", NODE_LOOPS), ("runtime", RUNTIME_LOOPS), ("balancer", BALANCER_LOOPS)):
                found = _by_role(loops, role)
                missing += [f"{role}/{name}" for name in names if name not in found or found[name]["healthy"]
                            or found[name]["last_error"] != f"RuntimeError: injected into {name}"]
            return missing

        try:
            wait_until(lambda: not not_failing_yet(), timeout=20, message="every loop reported failing")
        except AssertionError:
            raise AssertionError(f"not reported failing: {not_failing_yet()}\n{node.output}") from None
        faults.write_text("[]")

        # Then every loop is healthy again, with its failures counted
        def all_recovered() -> list[dict[str, Any]] | None:
            loops = [h for h in _loops(store_client, cluster_name)
                     if h["name"] in NODE_LOOPS | RUNTIME_LOOPS | BALANCER_LOOPS]
            return loops if loops and all(h["healthy"] and h["state"] == "running" for h in loops) else None

        recovered = wait_until(all_recovered, timeout=30, message="every loop recovered")
        assert all(h["failures"] >= UNHEALTHY_AFTER for h in recovered)
        assert node.proc.poll() is None and balancer.proc.poll() is None

        # And each failure was logged once per loop (with the loop's name), the repeats counted
        for name in NODE_LOOPS | RUNTIME_LOOPS:
            first = [line for line in node.lines
                     if re.search(rf"\] {re.escape(name)}: step failed \(RuntimeError: injected into", line)]
            assert len(first) == 1, (name, first)
            assert any(f"] {name}: recovered after" in line for line in node.lines), name
        for name in BALANCER_LOOPS:
            assert sum(f"{name}: step failed (RuntimeError: injected" in line for line in balancer.lines) == 1

        # And the work goes on: member a healthy, jobs tick, messages arrive, a redeploy deploys
        wait_until(lambda: _healthy_member(env), timeout=20, message="member a healthy again")
        ticks = int(store_client.get(prefix + "test:ticks") or 0)
        wait_until(lambda: int(store_client.get(prefix + "test:ticks") or 0) > ticks, timeout=10)
        requests.post(f"http://127.0.0.1:{port}/publish/7", timeout=5).raise_for_status()
        wait_until(lambda: b"7" in store_client.lrange(prefix + "test:received", 0, -1), timeout=10)
        (folder / "app.py").write_text(APP + "\nVERSION = 2\n")
        again = run_flask(["immutant", "deploy", "--name", "busy"], env, cwd=folder)
        assert again.returncode == 0 and "a: deployed" in again.stdout, again.stdout + again.stderr
    finally:
        faults.write_text("[]")
        balancer.cleanup()


def _member(env: dict[str, str]) -> dict[str, Any] | None:
    result = run_flask(["immutant", "status", "--json"], env)
    if result.returncode != 0:
        return None
    members = {m["name"]: m for m in json.loads(result.stdout)["members"]}
    return members.get("a")


def _unhealthy_member(env: dict[str, str]) -> dict[str, Any] | None:
    member = _member(env)
    return member if member is not None and not member["healthy"] else None


def _healthy_member(env: dict[str, str]) -> dict[str, Any] | None:
    member = _member(env)
    return member if member is not None and member["healthy"] else None
