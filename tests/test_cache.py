"""The cluster cache on the real embedded redis-server: cachelib interface, modes, expiry, the
atomic extras, memoize and its stampede guard, serialization, and failing open on a dead store."""

from __future__ import annotations

import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cachelib.base import BaseCache
from flask import Flask

from flask_immutant import ImmutantConfigError, ImmutantExtension, StoreUnavailableError, caching, get_state
from flask_immutant.caching import ClusterCache
from flask_immutant.caching.caches import registry_for

from support import REFUSALS, HoldingProxy, store_refusing, track, wait_until

MODES = ["distributed", "replicated", "invalidated", "local"]
SHARED = ["distributed", "invalidated"]


def make_app(home: Path, cluster: str, **config: Any) -> Flask:
    app = Flask("cache_tests")
    track(app)
    app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=cluster, IMMUTANT_CACHE=True, **config)
    ImmutantExtension(app)
    return app


@pytest.fixture
def app(clean_env: None, immutant_home: Path, embedded_store: Any, cluster_name: str) -> Iterator[Flask]:
    app = make_app(immutant_home, cluster_name)
    try:
        yield app
    finally:
        registry_for(app).close()


def open_cache(app: Flask, name: str = "c", **options: Any) -> ClusterCache:
    made = caching.cache(name, app=app, **options)
    if options.get("mode") == "invalidated":
        assert made.tracking()  # type: ignore[attr-defined]
    return made


# --- the cachelib interface, in every mode --------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_a_cachelib_cache(app: Flask, mode: str) -> None:
    # Given a cache of that mode
    cache = open_cache(app, mode=mode)
    assert isinstance(cache, BaseCache)
    # When values go through cachelib's interface, Then they come back as they went in
    assert cache.get("missing") is None and not cache.has("missing")
    assert cache.set("dict", {"a": [1, 2], "b": None}) and cache.get("dict") == {"a": [1, 2], "b": None}
    assert cache.set("none", None) and cache.has("none") and cache.get("none") is None
    assert cache.add("new", "x") and not cache.add("new", "y") and cache.get("new") == "x"
    cache.set_many({"m1": 1, "m2": "two"})
    assert cache.get_many("m1", "m2", "m3") == [1, "two", None]
    assert cache.get_dict("m1", "m3") == {"m1": 1, "m3": None}
    assert cache.inc("counter") == 1 and cache.inc("counter", 5) == 6 and cache.dec("counter", 2) == 4
    assert cache.delete("dict") and not cache.has("dict")
    cache.delete_many("m1", "m2")
    assert cache.get_many("m1", "m2") == [None, None]
    assert cache.clear() and cache.get("new") is None


def test_shared_modes_are_seen_by_every_app_of_the_cluster(clean_env, app, immutant_home, cluster_name) -> None:
    # Given a second app (another process would do the same) on the same cluster
    other = make_app(immutant_home, cluster_name)
    try:
        # When one writes to a distributed cache
        open_cache(app, "shared").set("k", {"v": 1})
        # Then the other reads it; a local cache of the same name is not shared
        assert open_cache(other, "shared").get("k") == {"v": 1}
        open_cache(app, "mine", mode="local").set("k", 1)
        assert open_cache(other, "mine", mode="local").get("k") is None
    finally:
        registry_for(other).close()


def test_one_name_has_one_configuration(app: Flask) -> None:
    first = open_cache(app, "named", ttl=5)
    assert open_cache(app, "named", ttl=5) is first
    with pytest.raises(ImmutantConfigError, match="already exists with mode=distributed ttl=5"):
        open_cache(app, "named", ttl=6)
    with pytest.raises(ImmutantConfigError, match="mode 'near' is not one of"):
        open_cache(app, "other", mode="near")
    with pytest.raises(ImmutantConfigError, match="cache name 'a:b' is not allowed"):
        open_cache(app, "a:b")


def test_the_cache_is_off_unless_its_flag_is_on(clean_env, immutant_home) -> None:
    app = Flask("off")
    app.config.update(IMMUTANT_HOME=str(immutant_home))
    ImmutantExtension(app)
    with pytest.raises(ImmutantConfigError, match="set IMMUTANT_CACHE = True"):
        caching.cache("x", app=app)
    with pytest.raises(RuntimeError, match="needs an app"):
        caching.cache("x")


def test_a_bad_serializer_setting_is_a_clear_error(clean_env, immutant_home) -> None:
    app = Flask("bad")
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CACHE=True, IMMUTANT_CACHE_SERIALIZER="yaml")
    with pytest.raises(ImmutantConfigError, match=r"IMMUTANT_CACHE_SERIALIZER='yaml'.*'msgpack' or 'json' or 'pickle'"):
        ImmutantExtension(app)


def test_status_shows_the_caches_of_the_app(app: Flask) -> None:
    open_cache(app, "seen", mode="local", max_entries=3).set("k", 1)
    caching_section = get_state(app).status()["caching"]
    assert caching_section["breaker"] == "closed"
    assert caching_section["caches"][0]["name"] == "seen" and caching_section["caches"][0]["max_entries"] == 3


def test_it_plugs_into_flask_caching(app: Flask) -> None:
    from flask_caching import Cache

    # Given Flask-Caching configured with the cluster cache as its backend
    flask_cache = Cache(app, config={"CACHE_TYPE": "flask_immutant.caching.flask_caching_backend",
                                     "CACHE_IMMUTANT_NAME": "fc", "CACHE_DEFAULT_TIMEOUT": 30})
    calls: list[int] = []

    @flask_cache.memoize()
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    # When Flask-Caching's memoize runs twice
    with app.app_context():
        assert square(4) == 16 and square(4) == 16
    # Then it computed once, and its entries live in the cluster cache of that name, under CACHE_KEY_PREFIX
    assert calls == [4]
    with app.app_context():
        flask_cache.set("x", 1)
    assert caching.cache("fc", ttl=30, app=app).get("flask_cache_x") == 1


# --- expiry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_ttl_expires_entries(app: Flask, mode: str) -> None:
    cache = open_cache(app, mode=mode, ttl=0.2)
    cache.set("k", "v")
    assert cache.get("k") == "v"
    wait_until(lambda: cache.get("k") is None, timeout=5, message="the entry to expire")
    cache.set("forever", 1, timeout=0)  # cachelib: 0 means no expiry
    assert cache.get("forever") == 1


@pytest.mark.parametrize("mode", SHARED)
def test_idle_expiry_slides_on_every_read(app: Flask, store_client: redis.Redis, mode: str) -> None:
    # Given an idle cache whose entry has almost run out
    cache = open_cache(app, mode=mode, idle=60)
    cache.set("k", "v")
    rkey = get_state(app).keys.cache_entry("c", "k")
    store_client.pexpire(rkey, 500)
    cache.near.flush() if mode == "invalidated" else None  # type: ignore[attr-defined]
    # When it is read
    assert cache.get("k") == "v"
    # Then its expiry starts over
    assert store_client.pttl(rkey) > 50_000


def test_ttl_caps_idle_sliding(app: Flask, store_client: redis.Redis) -> None:
    cache = open_cache(app, ttl=2, idle=60)
    cache.set("k", "v")
    rkey = get_state(app).keys.cache_entry("c", "k")
    assert cache.get("k") == "v"
    assert 0 < store_client.pttl(rkey) <= 2000  # read, but never past its ttl


def test_local_idle_expiry_slides(app: Flask) -> None:
    cache = open_cache(app, mode="local", idle=10)
    now = [1000.0]
    cache.clock = lambda: now[0]  # type: ignore[attr-defined]
    cache.set("k", "v")
    for _ in range(5):
        now[0] += 8
        assert cache.get("k") == "v"  # each read gives it another 10 s
    now[0] += 11
    assert cache.get("k") is None


@pytest.mark.parametrize("mode", ["distributed", "local"])
def test_max_entries_evicts_the_least_recently_used(app: Flask, mode: str) -> None:
    cache = open_cache(app, mode=mode, max_entries=3)
    for key in "abc":
        cache.set(key, key)
    assert cache.get("a") == "a"  # a is now more recent than b
    cache.set("d", "d")
    assert cache.get("b") is None
    assert [cache.get(key) for key in "acd"] == ["a", "c", "d"]


# --- Immutant's extras -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_put_if_absent_has_exactly_one_winner(app: Flask, mode: str) -> None:
    cache = open_cache(app, mode=mode)
    results: list[Any] = [None] * 16
    start = threading.Barrier(16)

    def contend(i: int) -> None:
        start.wait()
        results[i] = cache.put_if_absent("once", {"by": i})

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, result in enumerate(results) if result is None]
    assert len(winners) == 1
    assert all(result == {"by": winners[0]} for result in results if result is not None)
    assert cache.get("once") == {"by": winners[0]}


@pytest.mark.parametrize("mode", MODES)
def test_compare_and_set(app: Flask, mode: str) -> None:
    cache = open_cache(app, mode=mode)
    assert cache.compare_and_set("k", None, {"v": 1})  # None: only if absent
    assert not cache.compare_and_set("k", None, {"v": 2})
    assert not cache.compare_and_set("k", {"v": 9}, {"v": 2})
    assert cache.compare_and_set("k", {"v": 1}, {"v": 2})  # compared by value, not by bytes
    assert cache.get("k") == {"v": 2}


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_swaps_lose_no_update(app: Flask, mode: str) -> None:
    cache = open_cache(app, mode=mode)

    def add_some() -> None:
        for _ in range(25):
            cache.swap("total", lambda old: {"n": (old or {"n": 0})["n"] + 1})

    threads = [threading.Thread(target=add_some) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.get("total") == {"n": 150}


# --- memoize ---------------------------------------------------------------------------------


class CommandCounter:
    """Counts a client's round trips: what its connections send (one command, or a pipeline's
    commands at once), whether through the client, its pool or ``store.direct``; the heartbeat
    PINGs of a near cache's tracking connection are not the cache's reads."""

    def __init__(self, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        #: What was counted, for a failure's message (the start of each packed command).
        self.sent: list[bytes] = []
        connection_class = client.connection_pool.connection_class
        send_packed = connection_class.send_packed_command

        def counted(connection: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
            packed = b"".join(command if isinstance(command, list) else [command])
            if packed != b"*1\r\n$4\r\nPING\r\n":
                self.count += 1
                self.sent.append(packed[:80])
            return send_packed(connection, command, *args, **kwargs)

        monkeypatch.setattr(connection_class, "send_packed_command", counted)


@pytest.mark.parametrize(("mode", "round_trips"), [("distributed", 1), ("invalidated", 0)])
def test_a_memoize_hit_costs_one_round_trip_or_none(app, monkeypatch, mode, round_trips) -> None:
    cache = open_cache(app, mode=mode)
    calls: list[tuple[Any, ...]] = []

    @cache.memoize(60)
    def lookup(a: int, b: str = "x") -> dict[str, Any]:
        calls.append((a, b))
        return {"a": a, "b": b}

    assert lookup(1, b="y") == {"a": 1, "b": "y"}
    if mode == "invalidated":  # a near hit needs the tracking connection up, and a fill after it
        assert cache.tracking(10)  # type: ignore[attr-defined]
        assert lookup(1, b="y") == {"a": 1, "b": "y"}
    counter = CommandCounter(cache.client, monkeypatch)  # type: ignore[attr-defined]
    # The invalidation of the first fill's own SET can reach the tracking connection after the
    # second lookup filled the near entry, and empty it once (a GET of the key, seen on loaded CI
    # machines): the next read fills it again, and from then on a hit costs no round trip.
    for _attempt in range(20 if mode == "invalidated" else 1):
        counter.count, counter.sent = 0, []
        assert lookup(1, b="y") == {"a": 1, "b": "y"}
        if counter.count == round_trips:
            break
        time.sleep(0.05)
    assert counter.count == round_trips, counter.sent
    assert calls == [(1, "y")]
    assert lookup(2) == {"a": 2, "b": "x"} and len(calls) == 2


@pytest.mark.parametrize("mode", MODES)
def test_memoize_caches_none_and_forgets_on_request(app: Flask, mode: str) -> None:
    cache = open_cache(app, mode=mode)
    calls: list[int] = []

    @cache.memoize()
    def nothing(n: int) -> None:
        calls.append(n)

    nothing(1)
    nothing(1)
    assert calls == [1]
    assert nothing.forget(1)  # type: ignore[attr-defined]
    nothing(1)
    assert calls == [1, 1]


@pytest.mark.parametrize("mode", MODES)
def test_memoize_stampede_guard_computes_once(app: Flask, mode: str) -> None:
    # Given a slow function and many callers arriving while it runs
    cache = open_cache(app, mode=mode)
    running, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @cache.memoize(60)
    def slow(n: int) -> int:
        calls.append(n)
        running.set()
        release.wait(10)
        return n * 100

    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(slow(7)))
    first.start()
    assert running.wait(5)
    others = [threading.Thread(target=lambda: results.append(slow(7))) for _ in range(8)]
    for thread in others:
        thread.start()
    # When the computation finishes
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    # Then it ran once and every caller got its result
    assert calls == [7]
    assert results == [700] * 9


@pytest.mark.parametrize("mode", ["distributed", "local"])
def test_memoize_serves_the_stale_value_while_one_caller_recomputes(app: Flask, mode: str) -> None:
    cache = open_cache(app, mode=mode)
    version = [1]
    recomputing, release = threading.Event(), threading.Event()

    @cache.memoize(0.1, stale=60)
    def current() -> int:
        if version[0] > 1:
            recomputing.set()
            release.wait(10)
        return version[0]

    assert current() == 1
    version[0] = 2
    key = current.cache_key()  # type: ignore[attr-defined]
    wait_until(lambda: not cache._memo_read(key)[1], timeout=5, message="the result to go stale")
    # When one caller recomputes (and blocks), others get the stale value at once
    worker_result: list[int] = []
    worker = threading.Thread(target=lambda: worker_result.append(current()))
    worker.start()
    assert recomputing.wait(5)
    assert current() == 1
    release.set()
    worker.join(10)
    assert worker_result == [2]
    assert current() == 2


# --- serialization ---------------------------------------------------------------------------


def test_the_settings_rows_know_every_serializer_by_name() -> None:
    # The rows check names without loading the serializers (formats.py): the two lists agree
    from flask_immutant.caching import formats, serialization

    assert tuple(serialization.SAFE_SERIALIZERS) == formats.SAFE_NAMES
    assert tuple(serialization.CACHE_SERIALIZERS) == formats.CACHE_NAMES

EXPLOITED: list[str] = []


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (EXPLOITED.append, ("code ran",))


def test_bytes_in_the_store_are_never_unpickled_by_default(app, store_client, caplog) -> None:
    # Given someone who can write to Redis plants a pickle in a cache entry
    cache = open_cache(app)
    store_client.set(get_state(app).keys.cache_entry("c", "evil"), b"\x00" + pickle.dumps(Exploit()))
    # When the app reads it, Then it is a miss, nothing ran, and a warning says why
    with caplog.at_level(logging.WARNING, "flask_immutant.caching"):
        assert cache.get("evil") is None
    assert EXPLOITED == []
    assert "not valid msgpack" in caplog.text


def test_json_and_explicit_pickle_serializers(app: Flask) -> None:
    as_json = open_cache(app, "j", serializer="json")
    as_json.set("k", {"a": [1, "x"]})
    assert as_json.get("k") == {"a": [1, "x"]}
    as_pickle = open_cache(app, "p", serializer="pickle")
    as_pickle.set("k", {1, 2})
    assert as_pickle.get("k") == {1, 2}
    with pytest.raises(TypeError):
        open_cache(app, "m").set("k", Exploit())  # not in msgpack's closed set: a clear error, not a silent loss


# --- the store goes down ---------------------------------------------------------------------


@pytest.fixture
def outage_app(clean_env, immutant_home, cluster_name, private_redis) -> Iterator[Flask]:
    app = make_app(immutant_home, cluster_name, IMMUTANT_REDIS_URL=private_redis.url, IMMUTANT_CACHE_RETRY=0.2)
    try:
        yield app
    finally:
        registry_for(app).close()


@pytest.mark.parametrize("reply", REFUSALS)
def test_a_store_refusing_to_serve_fails_open_like_a_dead_one(outage_app, private_redis, reply) -> None:
    cache = open_cache(outage_app, mode="distributed")
    assert cache.set("k", "v")
    # When the store answers with an error reply that means "not now" (failover, no replicas, busy)
    with store_refusing(private_redis.socket, reply):
        # Then writes are dropped and reads miss or hit, with no exception
        assert cache.set("k2", "v2") is False
        assert cache.get("k") in ("v", None)
        assert cache.get("k2") is None
    # And the cache works again by itself
    wait_until(lambda: cache.set("k", "again") and cache.get("k") == "again", timeout=10,
               message="the cache to recover")


@pytest.mark.parametrize("mode", SHARED)
def test_a_dead_store_fails_open_behind_a_breaker_and_recovers(outage_app, private_redis, caplog, mode) -> None:
    cache = open_cache(outage_app, mode=mode)
    breaker = registry_for(outage_app).breaker
    cache.set("k", "v")
    assert cache.get("k") == "v"
    calls: list[int] = []

    @cache.memoize(60)
    def compute(n: int) -> int:
        calls.append(n)
        return n

    # When the store dies
    private_redis.stop()
    with caplog.at_level(logging.WARNING, "flask_immutant.caching"):
        # Then reads miss, writes are dropped, memoize computes, with no exception
        assert cache.get("other") is None
        assert cache.set("k2", "v2") is False
        assert compute(3) == 3 and compute(3) == 3
        # And the breaker answers further calls without trying the store
        assert breaker.state in ("open", "half-open")
        refused = breaker.refused
        assert cache.get("never-read") is None  # ("k" may still be near until tracking sees the outage)
        assert breaker.refused > refused or breaker.state == "half-open"
        # While atomic operations say plainly that nothing was coordinated
        with pytest.raises(StoreUnavailableError, match="the cluster store is unavailable"):
            cache.put_if_absent("k", 1)
    assert "cluster store unavailable" in caplog.text and "circuit open" in caplog.text
    # When the store is back, the cache works again by itself
    private_redis.start()
    wait_until(lambda: cache.set("k", "again") and cache.get("k") == "again", timeout=10,
               message="the cache to recover")
    assert breaker.state == "closed"


def test_an_invalidated_cache_on_a_tcp_store_keeps_near_copies(clean_env, immutant_home, cluster_name,
                                                                tcp_redis) -> None:
    # Given a store reached over TCP, as a store on another host is: redis-py 8 gives a TCP pool
    # RESP3 maintenance-notification settings that the RESP2 tracking connection must not copy
    app = make_app(immutant_home, cluster_name, IMMUTANT_REDIS_URL=tcp_redis.url)
    try:
        # When an invalidated cache starts tracking and an entry is read twice
        cache = open_cache(app, "tcp", mode="invalidated")
        cache.set("k", {"v": 1})
        # Then it is served from the near copy, and a write elsewhere is seen once its invalidation
        # is delivered (a cache's coherence bound: docs/guarantees.md, "Near copies")
        wait_until(lambda: cache.get("k") == {"v": 1} and cache.describe()["near_hits"] >= 1, timeout=10,
                   message="a near hit on the TCP store")
        other = make_app(immutant_home, cluster_name, IMMUTANT_REDIS_URL=tcp_redis.url)
        try:
            caching.cache("tcp", mode="invalidated", app=other).set("k", {"v": 2})
        finally:
            registry_for(other).close()
        wait_until(lambda: cache.get("k") == {"v": 2}, timeout=10, message="the write seen after its invalidation")
    finally:
        registry_for(app).close()


def test_the_tracking_connection_leaves_out_only_what_redis_py_adds_for_resp3(tcp_redis) -> None:
    """Contract with redis-py: the settings a TCP pool passes its connections are accepted by a
    RESP2 connection once the RESP3-only ones are left out, and nothing else is left out."""
    from flask_immutant.caching.near import RESP3_ONLY_SETTINGS, tracking_connection
    from flask_immutant.store import client_from_url

    client = client_from_url(tcp_redis.url)
    try:
        connection = tracking_connection(client)
        try:
            connection.connect()
            connection.send_command("PING")
            assert connection.read_response() in (b"PONG", "PONG")
            assert connection.protocol == 2
        finally:
            connection.disconnect()
        assert set(client.connection_pool.connection_kwargs) - RESP3_ONLY_SETTINGS >= {"host", "port"}
    finally:
        client.close()


# --- the plain GET/SET path (store/direct.py) ----------------------------------------------------


def test_direct_commands_keep_redis_py_s_pool_contract(embedded_store) -> None:
    """The public pool/connection methods store.direct relies on: replies as the client gives
    them (raw, no response callbacks), Redis errors raised with the connection still usable."""
    from flask_immutant.store import client_from_url, direct

    client = client_from_url(embedded_store.url)
    try:
        key = f"direct-{uuid.uuid4().hex}"
        assert direct.command(client, "SET", key, b"\x03abc", "PX", 60_000) == b"OK"
        assert direct.command(client, "SET", key, b"x", "NX") is None
        assert direct.command(client, "GET", key) == client.get(key) == b"\x03abc"
        client.lpush(key + "l", "1")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            direct.command(client, "GET", key + "l")
        assert direct.command(client, "GET", key) == b"\x03abc"  # the same pooled connection, usable
        assert len(client.connection_pool._available_connections) == 1  # released, not leaked
        pinned = direct.Pinned(client)
        assert pinned.command("GET", key) == b"\x03abc"
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            pinned.command("GET", key + "l")
        assert pinned.command("SET", key, b"y", "PX", 60_000) == b"OK"
        assert pinned.command("GET", key) == b"y"
        assert len(client.connection_pool._available_connections) == 0  # kept out of the pool
        pinned.close()
        assert len(client.connection_pool._available_connections) == 1  # given back
        client.delete(key, key + "l")
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["distributed", "invalidated"])
def test_a_killed_pooled_connection_costs_a_retry_not_a_miss(app: Flask, embedded_store, mode: str) -> None:
    cache = open_cache(app, f"killed-{mode}", mode=mode)
    cache.set("a", {"v": 1})
    assert cache.get("a") == {"v": 1}
    admin = redis.Redis(unix_socket_path=str(embedded_store.socket))
    try:
        # the connection of the plain GET/SET path, and the one the pool hands out
        for own in {cache._direct.command("CLIENT", "ID"), cache.client.client_id()}:  # type: ignore[attr-defined]
            admin.client_kill_filter(_id=own)
    finally:
        admin.close()
    if mode == "invalidated":
        cache.near.flush()  # type: ignore[attr-defined]  # read through to the store
    assert cache.get("a") == {"v": 1}
    cache.set("b", 2)
    assert cache.get("b") == 2
    assert cache.breaker.state == "closed"  # type: ignore[attr-defined]


# --- the store client fails on its side --------------------------------------------------------


def torn_down_under(cache: ClusterCache, proxy: HoldingProxy, marker: bytes, call: Callable[[], Any]) -> Any:
    """``call()`` with every connection of the cache's client (the pinned one of the plain GET/SET
    path included) torn down under it (:meth:`HoldingProxy.torn_down_under`)."""
    return proxy.torn_down_under(cache.client, marker, call)  # type: ignore[attr-defined]


@pytest.fixture
def proxied_app(clean_env, immutant_home, embedded_store, cluster_name, holding_proxy) -> Iterator[Flask]:
    app = make_app(immutant_home, cluster_name, IMMUTANT_REDIS_URL=holding_proxy.url)
    try:
        yield app
    finally:
        registry_for(app).close()


# the plain GET on the pinned connection; the near cache's fill, a GET+PTTL pipeline
@pytest.mark.parametrize(("mode", "marker"), [("distributed", b"GET"), ("invalidated", b"PTTL")])
def test_a_connection_torn_down_under_a_read_is_a_miss_not_an_error(proxied_app, holding_proxy, caplog, mode,
                                                                    marker) -> None:
    cache = open_cache(proxied_app, f"torn-{mode}", mode=mode)
    assert cache.set("k", "v")
    # When the read's connection is torn down by another thread while it waits for the reply
    with caplog.at_level(logging.WARNING, "flask_immutant.caching"):
        outcome = torn_down_under(cache, holding_proxy, marker, lambda: cache.get("k"))
    # Then the read misses, as when the store is down, and the cause is logged once with its traceback
    assert outcome is None
    faults = [r for r in caplog.records if "the store client failed" in r.getMessage()]
    assert len(faults) == 1 and faults[0].exc_info is not None
    # And the next read is served from the store, with the breaker never opened
    assert cache.get("k") == "v" and cache.set("k", "w") and cache.get("k") == "w"
    assert cache.breaker.state == "closed"  # type: ignore[attr-defined]


def test_a_connection_torn_down_under_an_atomic_call_says_nothing_was_coordinated(proxied_app,
                                                                                 holding_proxy) -> None:
    cache = open_cache(proxied_app, "torn-atomic", mode="distributed")
    outcome = torn_down_under(cache, holding_proxy, b"EVALSHA", lambda: cache.put_if_absent("k", 1))
    assert isinstance(outcome, StoreUnavailableError), outcome
    assert "inside the store client" in str(outcome)
