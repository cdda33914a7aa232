"""The cache across real processes: ``invalidated`` near caches stay coherent, and memoize
computes once for the whole cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from flask_immutant.keys import Keys

from support import wait_until

WORKER = '''
import json, sys, time
import redis
from flask import Flask
from flask_immutant import ImmutantExtension, caching, get_state

app = Flask("coherence")
app.config["IMMUTANT_CACHE"] = True
ImmutantExtension(app)
cache = caching.cache("shared", mode="invalidated", app=app)
assert cache.tracking(10), "tracking did not start"
store = get_state(app).store
prefix = get_state(app).keys.prefix

@cache.memoize(60)
def slow(n):
    store.rpush(prefix + "computations", n)
    while not store.exists(prefix + "release"):
        time.sleep(0.01)
    return n * 2

print(json.dumps("ready"), flush=True)
for line in sys.stdin:
    op, key, value = json.loads(line)
    if op == "get":
        out = cache.get(key)
    elif op == "set":
        out = cache.set(key, value)
    elif op == "delete":
        out = cache.delete(key)
    elif op == "memo":
        out = slow(value)
    else:
        out = cache.describe()
    print(json.dumps(out), flush=True)
'''


class Worker:
    """A python process with an ``invalidated`` cache, driven one JSON line at a time."""

    def __init__(self, script: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.read() == "ready"

    def read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"worker exited with {self.proc.poll()}"
        return json.loads(line)

    def send(self, op: str, key: str = "", value: Any = None) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([op, key, value]) + "\n")
        self.proc.stdin.flush()

    def __call__(self, op: str, key: str = "", value: Any = None) -> Any:
        self.send(op, key, value)
        return self.read()

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def workers(node_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    script = tmp_path / "cache_worker.py"
    script.write_text(WORKER)
    started: list[Worker] = []

    def start() -> Worker:
        worker = Worker(script, node_env)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.stop()


def test_a_write_in_one_process_is_never_read_stale_in_another(workers, store_client, cluster_name) -> None:
    # Given two processes whose near caches both hold k
    a, b = workers(), workers()
    assert a("set", "k", {"v": 1})
    # (B's near cache fills once its invalidation subscription is up, which a loaded machine delays)
    wait_until(lambda: b("get", "k") == {"v": 1} and b("stats")["near_hits"] >= 1, timeout=10,
               message="a read of k served by B's near cache, with no round trip")
    # When A writes and its write returns
    assert a("set", "k", {"v": 2})
    # Then B reads the new value within the documented bound (the invalidation's delivery)
    wait_until(lambda: b("get", "k") == {"v": 2}, timeout=1.0, message="B to see A's write")
    # And a write by anything else (here a plain client, as redis-cli would) invalidates too
    store_client.set(Keys(cluster_name).cache_entry("shared", "k"), b"\x00" + b"\xa5plain")
    wait_until(lambda: b("get", "k") == "plain", timeout=1.0, message="B to see an outside write")
    assert a("delete", "k")
    wait_until(lambda: b("get", "k") is None, timeout=1.0, message="B to see A's delete")


def test_memoize_computes_once_across_processes(workers, store_client: redis.Redis, cluster_name: str) -> None:
    keys = Keys(cluster_name)
    a, b = workers(), workers()
    # When both processes call the same memoized function while it is being computed
    a.send("memo", value=21)
    b.send("memo", value=21)
    wait_until(lambda: store_client.llen(keys.prefix + "computations") == 1, timeout=5)
    store_client.set(keys.prefix + "release", 1)
    # Then both get the result and it was computed once in the cluster
    assert a.read() == 42 and b.read() == 42
    assert store_client.lrange(keys.prefix + "computations", 0, -1) == [b"21"]


CACHED_VIEWS_APP = '''
from flask import Flask, Response, abort
from flask_caching import Cache, CachedResponse
from flask_immutant import ImmutantExtension, get_state

app = Flask("cached_views")
app.config.update(IMMUTANT_CACHE=True, CACHE_TYPE="flask_immutant.caching.flask_caching_backend",
                  CACHE_IMMUTANT_MODE=__import__("os").environ["CACHE_MODE"], CACHE_DEFAULT_TIMEOUT=300)
ImmutantExtension(app)
cache = Cache(app)

def count(view):
    """Calls of a view, counted in the store (so both nodes' calls add up)."""
    state = get_state(app)
    state.store.incr(state.keys.prefix + "calls:" + view)

@app.get("/calls/<view>")
def calls(view):
    state = get_state(app)
    return state.store.get(state.keys.prefix + "calls:" + view) or b"0"

@app.get("/tuple")
@cache.cached()
def as_tuple():
    count("tuple")
    return "created", 201, {"X-View": "tuple"}

@app.get("/cached-response")
@cache.cached()
def as_cached_response():
    count("cached-response")
    return CachedResponse(Response("dynamic ttl", headers={"X-View": "cached-response"}), 60)

@app.get("/missing")
@cache.cached()
def missing():
    count("missing")
    abort(404, "no such page")
'''


def responding(url: str) -> bool:
    import requests

    try:
        return requests.get(url + "/calls/none", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.mark.parametrize("mode", ["distributed", "invalidated"])
def test_a_cached_view_filled_through_one_node_is_served_identically_by_another(
        start_node, node_env, tmp_path: Path, mode: str) -> None:
    import requests

    # Given two clustered nodes serving an app whose @cached views return a tuple, a
    # CachedResponse and abort(404), counting their calls in the store
    app = tmp_path / "cached_views_app.py"
    app.write_text(CACHED_VIEWS_APP)
    first = start_node("--clustered", app=str(app), env={"CACHE_MODE": mode})
    second = start_node("--clustered", "--port-offset", "100", app=str(app), env={"CACHE_MODE": mode})
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    a, b = f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 100}"
    first.wait_for("joined cluster")
    second.wait_for("joined cluster")
    wait_until(lambda: responding(a) and responding(b), timeout=20, message="both nodes to serve the app")
    for path in ("/tuple", "/cached-response", "/missing"):
        # When the first request goes through node A and the second through node B
        filled = requests.get(a + path, timeout=5)
        served = requests.get(b + path, timeout=5)
        # Then B serves the same status, headers and body, from the cache: the view ran once
        assert (served.status_code, served.content, served.headers.get("X-View")) == \
               (filled.status_code, filled.content, filled.headers.get("X-View")), path
        assert served.headers.get("Content-Type") == filled.headers.get("Content-Type"), path
        assert requests.get(a + "/calls" + path, timeout=5).text == "1", path
    assert requests.get(b + "/tuple", timeout=5).status_code == 201
    assert requests.get(b + "/tuple", timeout=5).text == "created"  # not the JSON array ["created",201,...]
    assert b"no such page" in requests.get(b + "/missing", timeout=5).content


def _nested_tuples(depth: int) -> bytes:
    """A typed entry of ``depth`` tuples, each in the next: a few hundred bytes."""
    import msgpack

    from flask_immutant.caching.typed import TUPLE

    data = msgpack.packb([])
    for _ in range(depth):
        data = msgpack.packb(msgpack.ExtType(TUPLE, data))
    return data


def _exception(name: str, fields: dict[str, Any]) -> bytes:
    import msgpack

    from flask_immutant.caching.typed import HTTP_EXCEPTION

    return msgpack.packb(msgpack.ExtType(HTTP_EXCEPTION, msgpack.packb([name, fields])))


def test_a_store_writer_cannot_crash_or_break_a_cached_view(start_node, node_env, tmp_path: Path, store_client,
                                                            cluster_name) -> None:
    import requests

    # Given a node serving @cached views, with their entries in the cache
    app = tmp_path / "cached_views_app.py"
    app.write_text(CACHED_VIEWS_APP)
    node = start_node("--clustered", app=str(app), env={"CACHE_MODE": "distributed"})
    url = f"http://127.0.0.1:{node_env['IMMUTANT_HTTP_PORT']}"
    node.wait_for("joined cluster")
    wait_until(lambda: responding(url), timeout=20, message="the node to serve the app")
    for path in ("/tuple", "/cached-response", "/missing"):
        requests.get(url + path, timeout=5)
    entries = {path: [k for k in store_client.scan_iter(Keys(cluster_name).prefix + "cache:*") if path.encode() in k]
               for path in ("/tuple", "/cached-response", "/missing")}
    assert all(len(found) == 1 for found in entries.values()), entries
    # When a store writer replaces them with typed entries nested deep enough to overflow the C
    # stack of a decoder that recursed, and with HTTP exceptions whose fields cannot be served
    hostile = {
        "/tuple": _nested_tuples(300),
        "/cached-response": _nested_tuples(5000),
        "/missing": _exception("MethodNotAllowed", {"valid_methods": 5}),
    }
    for path, payload in hostile.items():
        store_client.set(entries[path][0], b"\x03" + payload)
    # Then each is a miss: the view runs again and is served as it should be, by the same process
    assert requests.get(url + "/cached-response", timeout=5).text == "dynamic ttl"
    assert requests.get(url + "/tuple", timeout=5).status_code == 201, node.output[-3000:]
    assert requests.get(url + "/missing", timeout=5).status_code == 404, node.output[-3000:]
    assert node.proc.poll() is None
    assert requests.get(url + "/calls/tuple", timeout=5).text == "2"
    for exception in ({"retry_after": "soon"}, {"response": "x"}, {"description": 5}):
        store_client.set(entries["/missing"][0], b"\x03" + _exception("NotFound", exception))
        assert requests.get(url + "/missing", timeout=5).status_code == 404, exception
