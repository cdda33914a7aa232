"""Store fuzz: garbage of every Redis type in every key family the package reads, and real nodes
go through a short cycle around it — deploy, publish, status and every listing, the console's
status API, a job tick, sessions, the cache — staying up and healthy, the good work done.

Seeded (``FUZZ_SEED``, default below) so a failure replays; bounded to one cycle on two nodes.
Out of scope here, each covered where it belongs: garbage on a queue being consumed (messaging
dead-letters it), and replacing a whole family key (``members``, ``deployments``...) by another
type, which is a store writer deleting that family: it is reported, not survived with its data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
from collections.abc import Callable
from typing import Any

import pytest
import requests
from test_hostile_records import _console_status

from flask_immutant.deploy.records import Deployment, cluster_secret
from flask_immutant.deploy.store import DeploymentStore
from flask_immutant.keys import Keys

from support import run_flask, wait_until

SEED = int(os.environ.get("FUZZ_SEED", "20261129"))
#: Garbage keys written per family and per Redis type.
PER_FAMILY = 3

APP = '''
from flask import Flask, session
from flask_immutant import ImmutantExtension, caching, daemons, get_state, jobs, messaging

app = Flask(__name__)
app.config.update(IMMUTANT_CLUSTERED=True, IMMUTANT_SESSIONS=True, IMMUTANT_CACHE=True, SECRET_KEY="fuzz")
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
        get_state().store.set(get_state().keys.prefix + "test:daemon", get_state().node_name)

daemons.start("keeper", keeper, app=app)

@app.get("/")
def index():
    return {"version": VERSION}

@app.post("/publish/<int:n>")
def publish(n):
    messaging.publish("/queue/work", n)
    return {"published": n}

@app.get("/session/<value>")
def remember(value):
    before = session.get("value")
    session["value"] = value
    return {"before": before}

@app.get("/cache/<key>")
def cached(key):
    fuzz = caching.cache("fuzz")
    value = fuzz.get(key)
    fuzz.set("good", key)
    return {"value": repr(value)[:40], "good": fuzz.get("good")}

VERSION = %r
'''


class Garbage:
    """Seeded random and malformed values, and writers of every Redis type."""

    TYPES = ("string", "hash", "list", "set", "zset", "stream")

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def name(self) -> str:
        return "fz" + "".join(self.rng.choices(string.ascii_lowercase + string.digits, k=6))

    def raw_name(self) -> bytes:
        choice = self.rng.randrange(3)
        if choice == 0:
            return bytes(self.rng.randrange(128, 256) for _ in range(5))  # not UTF-8
        if choice == 1:
            return ("fz-" + self.rng.choice(["..", "/", "|", "*", " ", "\n", "é", "%s"]) + self.name()).encode()
        return self.name().encode()

    def value(self) -> bytes:
        shapes: list[Callable[[], Any]] = [
            lambda: bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 40))),
            lambda: b"",
            lambda: b"null",
            lambda: b"[]",
            lambda: b"{}",
            lambda: b"1e999",
            lambda: str(10 ** self.rng.randrange(20, 60)).encode(),
            lambda: b"-" + str(10 ** 30).encode(),
            lambda: json.dumps(self._shape(2)).encode(),
            lambda: json.dumps({k: self._scalar() for k in self.rng.sample(self.FIELDS, 5)}).encode(),
            lambda: b'{"kind": "queue", "queue": 5}',
            lambda: b'{"state": [], "version": "1", "port": "x", "context_path": {}}',
            lambda: b'{"record": {"name": 1}, "signature": 7}',
            lambda: "\u2028\x00é".encode(),
        ]
        return self.rng.choice(shapes)()

    FIELDS = ["name", "node", "kind", "queue", "state", "version", "port", "pid", "host", "context_path", "app",
              "singleton", "since", "fencing_token", "restarts", "last_error", "ports", "address", "queues",
              "prefetched", "owner", "durable", "load", "record", "signature", "started_at", "clustered"]

    def _scalar(self) -> Any:
        return self.rng.choice([None, True, -1, 0, 10 ** 40, 1.5, float("1e300"), "", "x" * 50, [], {}, [1, "a"]])

    def _shape(self, depth: int) -> Any:
        if depth == 0:
            return self._scalar()
        if self.rng.random() < 0.5:
            return [self._shape(depth - 1) for _ in range(self.rng.randrange(3))]
        return {self.rng.choice(self.FIELDS): self._shape(depth - 1) for _ in range(self.rng.randrange(4))}

    def write(self, store: Any, key: str | bytes, kind: str | None = None) -> str:
        kind = kind or self.rng.choice(self.TYPES)
        store.delete(key)
        if kind == "string":
            store.set(key, self.value())
        elif kind == "hash":
            store.hset(key, mapping={self.raw_name(): self.value() for _ in range(3)})
        elif kind == "list":
            store.rpush(key, *[self.value() or b"-" for _ in range(3)])
        elif kind == "set":
            store.sadd(key, *[self.value() or b"-" for _ in range(3)])
        elif kind == "zset":
            store.zadd(key, {self.value() or b"-": self.rng.choice([-1e30, 0, 1.5, 1e30]) for _ in range(3)})
        else:
            store.xadd(key, {self.raw_name(): self.value() or b"-"})
        return kind

    def every_type(self, store: Any, key_of: Callable[[str], str]) -> list[str]:
        """Write PER_FAMILY keys of each type; returns the names used."""
        names = []
        for kind in self.TYPES:
            for _ in range(PER_FAMILY):
                name = self.name()
                self.write(store, key_of(name), kind)
                names.append(name)
        return names

    def fields(self, store: Any, key: str, count: int = PER_FAMILY * 3) -> None:
        """Garbage fields beside the good ones in a family's hash."""
        store.hset(key, mapping={self.raw_name(): self.value() for _ in range(count)})

    def members(self, store: Any, key: str, count: int = PER_FAMILY * 3) -> None:
        store.sadd(key, *[self.raw_name() for _ in range(count)])


def write_garbage(store: Any, keys: Keys, garbage: Garbage, job_app: str, secret: bytes) -> list[str]:
    """Garbage in every family the package reads; returns the session ids written."""
    # members: records and claims
    garbage.fields(store, keys.members)
    for name in garbage.every_type(store, keys.member_claim):
        store.hset(keys.members, name, garbage.value())
    for _ in range(PER_FAMILY):
        name = garbage.name()
        store.hset(keys.members, name, garbage.value())
        store.set(keys.member_claim(name), "elsewhere|1|x", px=120_000)
    # leases (and a daemon record whose lease is garbage)
    garbage.every_type(store, keys.lease)
    garbage.every_type(store, lambda n: keys.lease_fence(n))
    store.hset(keys.daemons, "phantom", json.dumps({"name": "phantom", "singleton": True, "state": "running",
                                                    "node": None, "since": None, "fencing_token": None,
                                                    "restarts": 0, "last_error": None}))
    garbage.write(store, keys.lease("daemon:phantom"))
    # deployments, their node states, archives (and a signed record whose archive is garbage)
    garbage.fields(store, keys.deployments)
    garbage.fields(store, keys.deployment_nodes("fuzzapp"))
    garbage.every_type(store, keys.deployment_nodes)
    garbage.every_type(store, keys.deployment_archive)
    for kind in Garbage.TYPES:
        digest = hashlib.sha256(kind.encode()).hexdigest()
        garbage.write(store, keys.deployment_archive(digest), kind)
        DeploymentStore(store, keys, secret).put(Deployment(
            name=f"fuzzarch-{kind}", import_path="app", root="/nonexistent", context_path=f"/fuzz-{kind}",
            archive=digest))
    # contexts, controls, weights
    for name in garbage.every_type(store, lambda n: keys.context(n, "/" + n)):
        store.sadd(keys.contexts, keys.context(name, "/" + name))
    garbage.members(store, keys.contexts)
    garbage.fields(store, keys.context_control)
    garbage.fields(store, keys.context_weight)
    # daemons, jobs (schedule, RQ job hashes, states)
    garbage.fields(store, keys.daemons)
    store.zadd(keys.jobs_schedule(job_app), {garbage.raw_name(): garbage.rng.choice([-1e30, 0.0, 1.0, 1e30])
                                             for _ in range(PER_FAMILY * 3)})
    garbage.every_type(store, lambda n: keys.rq_job_prefix + f"{job_app}-{n}")
    garbage.every_type(store, lambda n: keys.job_state(job_app, n))
    for name in garbage.every_type(store, keys.jobs_schedule):
        store.sadd(keys.prefix + "fuzz-note", name)
    # destinations, subscriptions, consumers, queues, dead letters
    garbage.fields(store, keys.messaging_destinations)
    for name in garbage.every_type(store, lambda n: f"{keys.messaging_namespace}:{n}"):
        store.hset(keys.messaging_destinations, f"/queue/{name}", json.dumps({"kind": "queue", "queue": name}))
        garbage.write(store, keys.messaging_dead(name))
    for name in garbage.every_type(store, keys.messaging_subscriptions):
        store.hset(keys.messaging_destinations, f"/topic/{name}", json.dumps({"kind": "topic"}))
    garbage.fields(store, keys.messaging_subscriptions("/topic/work"))
    for name in garbage.every_type(store, keys.messaging_consumer):
        store.sadd(keys.messaging_consumers, name)
    garbage.members(store, keys.messaging_consumers)
    garbage.members(store, keys.messaging_queues)
    # sessions and cache entries
    sids = [garbage.name() + "0" * 20 for _ in range(len(Garbage.TYPES))]
    for sid, kind in zip(sids, Garbage.TYPES, strict=True):
        garbage.write(store, keys.session("app", sid), kind)
    for index, kind in enumerate(Garbage.TYPES):
        garbage.write(store, keys.cache_entry("fuzz", f"k{index}"), kind)
    return sids


@pytest.fixture
def fuzz_env(node_env: dict[str, str]) -> dict[str, str]:
    return {**node_env, "IMMUTANT_FAILURE_TIMEOUT": "3"}


def test_nodes_live_through_garbage_in_every_key_family(start_node, fuzz_env, tmp_path, store_client,
                                                         cluster_name, immutant_home):
    env = fuzz_env
    keys = Keys(cluster_name)
    garbage = Garbage(SEED)
    # Given two nodes with an app deployed (daemon, job, listener, sessions, cache)
    a = start_node("--clustered", "--node-name", "a", env=env)
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", env=env)
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    folder = tmp_path / "fuzzapp"
    folder.mkdir()
    (folder / "app.py").write_text(APP % "1")
    first = run_flask(["immutant", "deploy", "--name", "fuzzapp"], env, cwd=folder)
    assert first.returncode == 0, first.stdout + first.stderr
    jobs = wait_until(lambda: json.loads(run_flask(["immutant", "jobs", "--json"], env).stdout), timeout=15)
    # When every key family the package reads gets garbage of every Redis type (seed printed on failure)
    secret = cluster_secret({"IMMUTANT_HOME": str(immutant_home)})
    sids = write_garbage(store_client, keys, garbage, jobs[0]["app"], secret)
    store_client.publish(keys.deployments_changed, "fuzz")
    store_client.publish(keys.contexts_changed, "fuzz")
    context = f"seed {SEED}"

    # Then a new version deploys on both nodes
    (folder / "app.py").write_text(APP % "2")
    second = run_flask(["immutant", "deploy", "--name", "fuzzapp"], env, cwd=folder)
    assert second.returncode == 0 and "a: deployed" in second.stdout and "b: deployed" in second.stdout, (
        context, second.stdout, second.stderr)
    base = int(env["IMMUTANT_HTTP_PORT"])
    ports = (base, base + 100)
    for port in ports:
        wait_until(lambda port=port: _get(port, "/") == {"version": "2"}, timeout=10, message=context)
    # And messages are delivered
    requests.post(f"http://127.0.0.1:{ports[0]}/publish/42", timeout=5).raise_for_status()
    wait_until(lambda: b"42" in store_client.lrange(keys.prefix + "test:received", 0, -1), timeout=10,
               message=context)
    # And every listing answers (warnings on stderr, never a traceback), and so does the console API
    for command in (["status"], ["status", "--json"], ["jobs"], ["daemons"], ["queues"], ["list"], ["ctl", "show"]):
        result = run_flask(["immutant", *command], env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (context, command, result.stderr[-2000:])
    status = json.loads(run_flask(["immutant", "status", "--json"], env).stdout)
    assert status["warnings"], context
    assert {d["name"] for d in status["daemons"]} >= {"keeper"}
    assert [j["name"] for j in status["jobs"]] == ["tick"]
    document = _console_status(env)
    assert {m["name"] for m in document["members"]} == {"a", "b"}
    # And the job ticks, the daemon runs, sessions and the cache work around garbage entries
    ticks = int(store_client.get(keys.prefix + "test:ticks") or 0)
    wait_until(lambda: int(store_client.get(keys.prefix + "test:ticks") or 0) > ticks + 1, timeout=10,
               message=context)
    store_client.delete(keys.prefix + "test:daemon")
    wait_until(lambda: store_client.get(keys.prefix + "test:daemon"), timeout=10, message=context)
    for sid in sids:
        response = requests.get(f"http://127.0.0.1:{ports[0]}/session/x", cookies={"session": sid}, timeout=5)
        assert response.status_code == 200, (context, sid, response.text)
    browser = requests.Session()
    assert browser.get(f"http://127.0.0.1:{ports[0]}/session/one", timeout=5).json() == {"before": None}
    assert browser.get(f"http://127.0.0.1:{ports[1]}/session/two", timeout=5).json() == {"before": "one"}
    for index in range(len(Garbage.TYPES)):
        response = requests.get(f"http://127.0.0.1:{ports[0]}/cache/k{index}", timeout=5)
        assert response.status_code == 200 and response.json()["good"] == f"k{index}", (context, response.text)
    # And both nodes are up, members, and no loop of theirs keeps failing
    assert a.proc.poll() is None and b.proc.poll() is None

    def healthy() -> bool:
        members = json.loads(run_flask(["immutant", "status", "--json"], env).stdout)["members"]
        return {m["name"] for m in members if m["healthy"]} == {"a", "b"}

    try:
        wait_until(healthy, timeout=15, interval=0.5, message=context)
    except AssertionError:
        loops = json.loads(run_flask(["immutant", "status", "--json"], env).stdout)["loops"]
        raise AssertionError(f"{context}: failing loops {[h for h in loops if not h['healthy']]}") from None


def _get(port: int, path: str) -> Any:
    try:
        response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=3)
    except requests.ConnectionError:
        return None
    return response.json() if response.status_code == 200 else None





def test_a_family_key_of_another_type_is_reported_and_the_rest_listed(node_env, store_client, cluster_name):
    """A store writer who replaces a whole family (``members``, ``deployments``...) by another
    Redis type takes that family away; the status document and every listing still answer."""
    from flask_immutant.extension import ImmutantState

    keys = Keys(cluster_name)
    expected = {keys.members: "hash", keys.deployments: "hash", keys.daemons: "hash",
                keys.messaging_destinations: "hash", keys.context_control: "hash", keys.context_weight: "hash",
                keys.contexts: "set", keys.messaging_consumers: "set", keys.loop_health_index: "set",
                keys.jobs_schedule("app"): "zset", keys.deployment_nodes("app"): "hash"}
    state = ImmutantState.build(environ=node_env)
    garbage = Garbage(SEED)
    for round_ in range(2):
        for key, kind in expected.items():
            garbage.write(store_client, key, garbage.rng.choice([t for t in Garbage.TYPES if t != kind]))
        document = state.status()
        assert document["members"] == [] and document["daemons"] == [] and document["deployments"] == []
        assert any(keys.members in warning for warning in document["warnings"]), (round_, document["warnings"])
    for command in (["status"], ["jobs"], ["daemons"], ["queues"], ["list"], ["ctl", "show"]):
        result = run_flask(["immutant", *command], node_env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr[-1500:])


def test_a_wake_list_of_another_type_neither_fails_publishes_nor_stalls_consumers(start_node, fuzz_env, tmp_path,
                                                                                 store_client, cluster_name):
    import time

    keys = Keys(cluster_name)
    # Given a node consuming a queue
    node = start_node("--clustered", "--node-name", "a", env=fuzz_env)
    node.wait_for("joined cluster")
    folder = tmp_path / "fuzzapp"
    folder.mkdir()
    (folder / "app.py").write_text(APP % "1")
    assert run_flask(["immutant", "deploy", "--name", "fuzzapp"], fuzz_env, cwd=folder).returncode == 0
    port = int(fuzz_env["IMMUTANT_HTTP_PORT"])
    wait_until(lambda: _get(port, "/") == {"version": "1"}, timeout=10)
    node.wait_for("messaging: consuming /queue/work")
    # When a store writer replaces the queue's list of wake tokens by a string
    wake = keys.messaging_wake(f"{cluster_name}.q.work")
    store_client.set(wake, "garbage")
    time.sleep(1.5)  # idle consumers go back to waiting on it
    # Then publishing still succeeds, once, and the message is delivered
    for n in (1, 2, 3):
        response = requests.post(f"http://127.0.0.1:{port}/publish/{n}", timeout=5)
        assert response.status_code == 200, response.text[:300]
    wait_until(lambda: sorted(store_client.lrange(keys.prefix + "test:received", 0, -1)) == [b"1", b"2", b"3"],
               timeout=10)
    # And the consumers did not crash on it (the tokens list is theirs to repair)
    assert store_client.type(wake) in (b"list", b"none")
    assert "Consumer encountered an unexpected error" not in node.output, node.output[-3000:]


def test_json_nested_past_the_parsers_recursion_limit_is_skipped_like_any_garbage(
        start_node, fuzz_env, tmp_path, store_client, cluster_name):
    keys = Keys(cluster_name)
    deep = b"[" * 100_000  # json.loads raises RecursionError, which is no ValueError
    # Given a node with an app (daemon, job, listener) deployed
    node = start_node("--clustered", "--node-name", "a", env=fuzz_env)
    node.wait_for("joined cluster")
    folder = tmp_path / "fuzzapp"
    folder.mkdir()
    (folder / "app.py").write_text(APP % "1")
    assert run_flask(["immutant", "deploy", "--name", "fuzzapp"], fuzz_env, cwd=folder).returncode == 0
    jobs = wait_until(lambda: json.loads(run_flask(["immutant", "jobs", "--json"], fuzz_env).stdout), timeout=15)
    # When a store writer puts such JSON in every family read as JSON
    for family in (keys.members, keys.deployments, keys.deployment_nodes("fuzzapp"), keys.daemons,
                   keys.messaging_destinations, keys.messaging_subscriptions("/topic/work"), keys.context_control,
                   keys.context_weight, keys.deployments_issued, keys.messaging_dead(f"{cluster_name}.q.work")):
        store_client.hset(family, "fzdeep", deep)
    for key in (keys.lease("daemon:fzdeep"), keys.messaging_consumer("fzdeep"), keys.loop_health("fzdeep"),
                keys.context("fzdeep", "/fzdeep")):
        store_client.set(key, deep)
    store_client.sadd(keys.messaging_consumers, "fzdeep")
    store_client.sadd(keys.loop_health_index, "fzdeep")
    store_client.sadd(keys.contexts, keys.context("fzdeep", "/fzdeep"))
    store_client.hset(keys.rq_job_prefix + f"{jobs[0]['app']}-tick", "meta", deep)
    store_client.publish(keys.events, deep)
    store_client.publish(keys.deployments_changed, "fzdeep")
    # Then every listing answers without a traceback, a new version deploys, and the node stays healthy
    for command in (["status", "--json"], ["jobs"], ["daemons"], ["queues"], ["list"], ["ctl", "show"]):
        result = run_flask(["immutant", *command], fuzz_env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr[-2000:])
    (folder / "app.py").write_text(APP % "2")
    second = run_flask(["immutant", "deploy", "--name", "fuzzapp"], fuzz_env, cwd=folder)
    assert second.returncode == 0 and "a: deployed" in second.stdout, second.stdout + second.stderr
    _console_status(fuzz_env)

    def healthy() -> bool:
        members = json.loads(run_flask(["immutant", "status", "--json"], fuzz_env).stdout)["members"]
        return [m["name"] for m in members if m["healthy"]] == ["a"]

    wait_until(healthy, timeout=15, interval=0.5)
    assert node.proc.poll() is None
