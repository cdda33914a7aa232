"""Server-side sessions on the real embedded redis-server: safe data, no write per request with a
sliding expiry, regenerate, the opt-in per-key merge, and a 503 while the store is down."""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis
from flask import Flask, session
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_immutant import ImmutantConfigError, ImmutantExtension, get_state
from flask_immutant.web import regenerate
from flask_immutant.web.sessions import SLIDE_GRANULARITY_CAP_MS

from support import REFUSALS, HoldingProxy, store_refusing, track, wait_until


def make_app(home: Path, cluster: str, **config: Any) -> Flask:
    app = Flask("sessions_app")
    track(app)
    app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=cluster, IMMUTANT_SESSIONS=True, **config)
    ImmutantExtension(app)
    gates: dict[str, tuple[threading.Event, threading.Event]] = {}  # key -> (entered, release)
    app.extensions["gates"] = gates

    @app.post("/login/<user>")
    def login(user: str) -> str:
        regenerate()
        session["user"] = user
        return "ok"

    @app.get("/whoami")
    def whoami() -> str:
        return str(session.get("user", "nobody"))

    @app.post("/cart/<item>")
    def add_to_cart(item: str) -> str:
        session.setdefault("cart", []).append(item)  # a nested change: no session.modified = True
        return ",".join(session["cart"])

    @app.post("/set/<key>/<value>")
    def set_value(key: str, value: str) -> str:
        gate = gates.get(key)
        session[key] = value
        if gate is not None:
            gate[0].set()
            gate[1].wait(10)  # hold this request open while another one runs
        return "ok"

    @app.post("/logout")
    def logout() -> str:
        session.clear()
        return "bye"

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    return app


@pytest.fixture
def app(clean_env: None, immutant_home: Path, embedded_store: Any, cluster_name: str) -> Flask:
    return make_app(immutant_home, cluster_name)


def sid_of(client: FlaskClient) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


def session_key(app: Flask, client: FlaskClient) -> str:
    return get_state(app).keys.session(app.name, sid_of(client))


def writes(store: redis.Redis) -> dict[str, int]:
    """Calls of every command that writes a session, from the server's own statistics."""
    stats = store.info("commandstats")
    return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0)
            for name in ("set", "hset", "del", "pexpire", "evalsha", "eval", "hdel")}


# --- storage --------------------------------------------------------------------------------


def test_a_session_is_a_hash_of_msgpack_values_under_the_app_and_cluster(app, store_client) -> None:
    client = app.test_client()
    assert client.post("/login/alice").text == "ok"
    key = session_key(app, client)
    assert key.startswith(f"immutant:{get_state(app).keys.cluster}:session:sessions_app:")
    stored = store_client.hgetall(key)
    assert msgpack.unpackb(stored[b"user"]) == "alice"
    assert 0 < store_client.pttl(key) <= app.permanent_session_lifetime.total_seconds() * 1000
    assert client.get("/whoami").text == "alice"


def test_json_sessions(clean_env, immutant_home, embedded_store, cluster_name, store_client) -> None:
    app = make_app(immutant_home, cluster_name, IMMUTANT_SESSION_SERIALIZER="json")
    client = app.test_client()
    client.post("/login/bob")
    assert store_client.hget(session_key(app, client), "user") == b'"bob"'
    assert client.get("/whoami").text == "bob"


def test_pickle_is_refused_for_sessions(clean_env, immutant_home) -> None:
    with pytest.raises(ImmutantConfigError, match=r"IMMUTANT_SESSION_SERIALIZER='pickle'.*never pickle"):
        make_app(immutant_home, "x", IMMUTANT_SESSION_SERIALIZER="pickle")


EXPLOITED: list[str] = []


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (EXPLOITED.append, ("code ran",))


def test_data_that_is_not_valid_is_no_session_and_is_never_unpickled(app, store_client, caplog) -> None:
    # Given a session whose stored value someone replaced with a pickle
    client = app.test_client()
    client.post("/login/alice")
    old_sid = sid_of(client)
    store_client.hset(session_key(app, client), "user", pickle.dumps(Exploit()))
    # When the session is read
    with caplog.at_level(logging.WARNING, "flask_immutant.sessions"):
        assert client.get("/whoami").text == "nobody"
    # Then nothing ran, a warning says why, and the request started over with a new id
    assert EXPLOITED == []
    assert "not valid msgpack" in caplog.text
    client.post("/cart/x")
    assert sid_of(client) != old_sid


def test_an_unknown_session_id_is_never_adopted(app) -> None:
    client = app.test_client()
    client.set_cookie("session", "attacker-chosen-id-0123456789")
    client.post("/cart/x")
    assert sid_of(client) != "attacker-chosen-id-0123456789"


def test_threads_racing_for_the_first_store_client_share_one(app) -> None:
    """The first request with a session cookie starts the near cache's tracking thread, and both
    threads ask for the store client at once. On Python 3.12+ (cached_property lost its lock) each
    made one; the loser's ``__del__`` closed its pool under the request reading on it, which
    answered 500 (``'NoneType' object has no attribute 'readline'``)."""
    state = get_state(app)
    assert "store" not in vars(state)
    barrier = threading.Barrier(8)
    seen: list[redis.Redis] = []

    def first_use() -> None:
        barrier.wait(10)
        seen.append(state.store)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(seen) == 8 and all(client is seen[0] for client in seen)
    assert seen[0].ping()


# --- writes -----------------------------------------------------------------------------------


def test_a_request_that_does_not_change_the_session_does_not_write_it(app, store_client) -> None:
    client = app.test_client()
    client.post("/login/alice")
    before = writes(store_client)
    for _ in range(5):
        assert client.get("/whoami").text == "alice"
    assert writes(store_client) == before


def test_expiry_slides_without_rewriting_the_session(app, store_client) -> None:
    # Given a session whose expiry has slid by more than the granularity
    client = app.test_client()
    client.post("/login/alice")
    key = session_key(app, client)
    lifetime_ms = int(app.permanent_session_lifetime.total_seconds() * 1000)
    store_client.pexpire(key, lifetime_ms - 2 * SLIDE_GRANULARITY_CAP_MS)
    before = writes(store_client)
    # When a request reads it
    response = client.get("/whoami")
    # Then its expiry starts over with one PEXPIRE and no data written; the cookie slides too
    assert store_client.pttl(key) > lifetime_ms - SLIDE_GRANULARITY_CAP_MS
    after = writes(store_client)
    assert after["pexpire"] == before["pexpire"] + 1
    assert {k: v for k, v in after.items() if k != "pexpire"} == {k: v for k, v in before.items() if k != "pexpire"}
    assert "Expires=" in response.headers["Set-Cookie"]


def test_a_nested_change_is_saved_without_marking_the_session_modified(app) -> None:
    client = app.test_client()
    assert client.post("/cart/apple").text == "apple"
    assert client.post("/cart/pear").text == "apple,pear"
    assert client.post("/cart/fig").text == "apple,pear,fig"


def test_logout_deletes_the_session_and_its_cookie(app, store_client) -> None:
    client = app.test_client()
    client.post("/login/alice")
    key = session_key(app, client)
    client.post("/logout")
    assert not store_client.exists(key)
    assert client.get_cookie("session") is None
    assert client.get("/whoami").text == "nobody"


def test_regenerate_at_login_gives_a_new_id_and_keeps_the_data(app, store_client) -> None:
    # Given an anonymous session with data (its id may have been planted: fixation)
    client = app.test_client()
    client.post("/cart/book")
    anonymous = session_key(app, client)
    # When the user logs in (the view calls regenerate())
    client.post("/login/alice")
    # Then the old id leads nowhere and the new one has everything
    assert not store_client.exists(anonymous)
    assert session_key(app, client) != anonymous
    assert client.get("/whoami").text == "alice"
    assert client.post("/cart/pen").text == "book,pen"


# --- concurrent requests on one session -----------------------------------------------------


def concurrent_changes(app: Flask) -> dict[str, str]:
    """Request A sets ``a`` and is held open while request B, on the same session, sets ``b``."""
    client = app.test_client()
    client.post("/login/alice")
    cookie = sid_of(client)
    entered, release = app.extensions["gates"]["a"] = (threading.Event(), threading.Event())
    other = app.test_client()
    other.set_cookie("session", cookie)
    slow = threading.Thread(target=lambda: client.post("/set/a/1"))
    slow.start()
    assert entered.wait(5)  # A has read the session
    assert other.post("/set/b/2").text == "ok"
    release.set()
    slow.join(10)
    fields = get_state(app).store.hgetall(get_state(app).keys.session(app.name, cookie))
    return {k.decode(): msgpack.unpackb(v) for k, v in fields.items()}


def test_without_merge_the_last_writer_replaces_the_session(app) -> None:
    stored = concurrent_changes(app)
    assert stored.get("a") == "1" and "b" not in stored  # B's change was lost: documented


def test_merge_keeps_concurrent_changes_to_different_keys(clean_env, immutant_home, embedded_store, cluster_name):
    app = make_app(immutant_home, cluster_name, IMMUTANT_SESSION_MERGE=True)
    stored = concurrent_changes(app)
    assert stored["a"] == "1" and stored["b"] == "2" and stored["user"] == "alice"


def test_merge_does_not_bring_back_a_session_that_ended(clean_env, immutant_home, embedded_store, cluster_name,
                                                        store_client) -> None:
    app = make_app(immutant_home, cluster_name, IMMUTANT_SESSION_MERGE=True)
    client = app.test_client()
    client.post("/login/alice")
    key = session_key(app, client)
    entered, release = app.extensions["gates"]["a"] = (threading.Event(), threading.Event())
    slow = threading.Thread(target=lambda: client.post("/set/a/1"))
    slow.start()
    assert entered.wait(5)
    store_client.delete(key)  # logged out (or expired) meanwhile
    release.set()
    slow.join(10)
    assert not store_client.exists(key)


# --- the store goes down --------------------------------------------------------------------


@pytest.fixture
def outage_app(clean_env, immutant_home, cluster_name, private_redis) -> Iterator[Flask]:
    yield make_app(immutant_home, cluster_name, IMMUTANT_REDIS_URL=private_redis.url)


def test_a_dead_store_answers_503_with_a_logged_reason_and_recovers(outage_app, private_redis, caplog) -> None:
    app = outage_app
    client = app.test_client()
    client.post("/login/alice")
    # When the store dies
    private_redis.stop()
    with caplog.at_level(logging.INFO, "flask_immutant.sessions"):
        response = client.get("/whoami")
        # Then a request using its session gets a clear 503, not a traceback
        assert response.status_code == 503
        assert "session store is unavailable" in response.text and "Traceback" not in response.text
        assert response.headers["Retry-After"] == "1"
        # And a request that does not use the session is served
        assert client.get("/ping").text == "pong"
        # And a new visitor's login, which must write, gets a 503 too
        assert app.test_client().post("/login/bob").status_code == 503
    assert "cluster store unavailable" in caplog.text and "503" in caplog.text
    # When the store is back, sessions work again with nothing restarted
    private_redis.start()
    fresh = app.test_client()
    wait_until(lambda: fresh.post("/login/carol").status_code == 200, timeout=10, message="sessions to recover")
    assert fresh.get("/whoami").text == "carol"


@pytest.mark.parametrize("reply", REFUSALS)
def test_a_store_refusing_to_serve_is_an_outage_not_a_bug(outage_app, private_redis, reply) -> None:
    client = outage_app.test_client()
    client.post("/login/alice")
    # When the store answers with an error reply that means "not now" (failover, no replicas, busy)
    with store_refusing(private_redis.socket, reply):
        # Then a request that must write its session gets a 503, never a 500
        assert app_response(outage_app.test_client().post("/login/bob")) == 503
        assert client.get("/ping").text == "pong"
    # And sessions work again once it serves
    fresh = outage_app.test_client()
    wait_until(lambda: fresh.post("/login/carol").status_code == 200, timeout=10, message="sessions to recover")


# --- the store client fails on its side --------------------------------------------------------


def torn_down_under(app: Flask, proxy: HoldingProxy, marker: bytes,
                    request: Callable[[], TestResponse]) -> TestResponse:
    """``request`` with the app's store connections torn down under it (:meth:`HoldingProxy.torn_down_under`)."""
    response = proxy.torn_down_under(get_state(app).store, marker, request)
    assert not isinstance(response, Exception), response
    return response


@pytest.fixture
def proxied_app(clean_env, immutant_home, embedded_store, cluster_name, holding_proxy) -> Flask:
    return make_app(immutant_home, cluster_name, IMMUTANT_REDIS_URL=holding_proxy.url)


def client_fault_logged(caplog: pytest.LogCaptureFixture) -> bool:
    faults = [r for r in caplog.records if "failed in the client" in r.getMessage()]
    return len(faults) == 1 and faults[0].exc_info is not None and faults[0].levelno == logging.ERROR


def test_a_connection_torn_down_under_a_session_read_is_a_503(proxied_app, holding_proxy, caplog) -> None:
    app = proxied_app
    client = app.test_client()
    client.post("/login/alice")
    # When the connection of a session read is torn down by another thread while it waits
    with caplog.at_level(logging.INFO, "flask_immutant.sessions"):
        response = torn_down_under(app, holding_proxy, b"HGETALL", lambda: client.get("/whoami"))
    # Then the request gets the 503 of an unavailable store, not a 500, and the cause is logged once
    assert app_response(response) == 503 and response.headers["Retry-After"] == "1"
    assert client_fault_logged(caplog)
    assert "Exception on /whoami" not in caplog.text and "Request finalizing failed" not in caplog.text
    # And the session is intact, the next request is served, and the breaker never opened
    assert client.get("/whoami").text == "alice"
    assert app.session_interface.breaker.state == "closed"  # type: ignore[attr-defined]


def test_a_connection_torn_down_under_a_session_write_is_a_503(proxied_app, holding_proxy, caplog) -> None:
    app = proxied_app
    client = app.test_client()
    client.post("/login/alice")
    # When the connection of a session write (the replacing MULTI ... EXEC) is torn down under it
    with caplog.at_level(logging.INFO, "flask_immutant.sessions"):
        response = torn_down_under(app, holding_proxy, b"HSET", lambda: client.post("/set/color/red"))
    # Then the view's answer becomes a 503 with no cookie (its change was not saved), logged once
    assert app_response(response) == 503 and "Set-Cookie" not in response.headers
    assert client_fault_logged(caplog)
    # And the session works on
    assert client.post("/set/color/blue").status_code == 200 and client.get("/whoami").text == "alice"


def test_save_session_ignores_a_session_that_was_never_opened(app) -> None:
    """Flask hands ``save_session`` None when ``open_session`` raised; the error is Flask's to
    answer, and saving must not add a crash of its own ("Request finalizing failed")."""
    response = app.response_class("kept")
    with app.test_request_context("/"):
        app.session_interface.save_session(app, None, response)
    assert response.status_code == 200 and response.get_data() == b"kept" and "Set-Cookie" not in response.headers


def test_a_client_fault_in_the_breaker_s_trial_does_not_keep_it_open(
        clean_env, immutant_home, cluster_name, private_redis, private_proxy) -> None:
    app = make_app(immutant_home, cluster_name, IMMUTANT_REDIS_URL=private_proxy.url)
    breaker = app.session_interface.breaker  # type: ignore[attr-defined]
    client = app.test_client()
    client.post("/login/alice")
    # Given a breaker opened by an outage, and the store back
    private_redis.stop()
    assert client.get("/whoami").status_code == 503 and breaker.state != "closed"
    private_redis.start()
    wait_until(lambda: breaker.state == "half-open", timeout=10, message="the breaker to let a trial through")
    # When the trial call fails inside the store client
    assert torn_down_under(app, private_proxy, b"HGETALL", lambda: client.get("/whoami")).status_code == 503
    # Then a later call is the trial instead (sessions recover), rather than the breaker staying open
    # (the restarted store kept no data: the session is gone, the request is served)
    wait_until(lambda: client.get("/whoami").status_code == 200, timeout=10, message="sessions to recover")
    assert breaker.state == "closed"


# --- the near cache ---------------------------------------------------------------------------


def read_near(app: Flask, client: FlaskClient, expected: str) -> None:
    """Wait until a read of the session is served from the near cache (tracking is up)."""
    near = app.session_interface.near  # type: ignore[attr-defined]
    hits = near.hits
    wait_until(lambda: client.get("/whoami").text == expected and near.hits > hits, timeout=10,
               message="a read of the session served by the near cache")


def session_reads(store: redis.Redis) -> int:
    stats = store.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("hgetall", "pttl"))


def test_a_hot_unchanged_session_is_read_with_no_store_round_trip(app, store_client) -> None:
    client = app.test_client()
    client.post("/login/alice")
    read_near(app, client, "alice")
    before = session_reads(store_client)
    for _ in range(10):
        assert client.get("/whoami").text == "alice"
    assert session_reads(store_client) == before


def test_a_session_on_a_tcp_store_is_read_near_too(clean_env, immutant_home, cluster_name, tcp_redis) -> None:
    # Given a store reached over TCP, as a store on another host is (redis-py 8 configures TCP
    # pools with settings the session tracker's RESP2 connection must not copy)
    app = make_app(immutant_home, cluster_name, IMMUTANT_REDIS_URL=tcp_redis.url)
    client = app.test_client()
    client.post("/login/alice")
    # Then a hot session is read from the near cache
    read_near(app, client, "alice")
    # And a change by another client of the store is seen by the very next read
    outside = redis.Redis.from_url(tcp_redis.url)
    try:
        outside.hset(session_key(app, client), "user", msgpack.packb("bob"))
    finally:
        outside.close()
    assert client.get("/whoami").text == "bob"


def test_a_change_by_anyone_else_is_never_read_stale_from_the_near_cache(app, store_client) -> None:
    # Given a session this process reads from its near cache
    client = app.test_client()
    client.post("/login/user0")
    key = session_key(app, client)
    read_near(app, client, "user0")
    near = app.session_interface.near  # type: ignore[attr-defined]
    hits = near.hits
    for n in range(1, 301):
        assert client.get("/whoami").text == f"user{n - 1}"
        # When another client of the store changes it and its write returns
        store_client.hset(key, "user", msgpack.packb(f"user{n}"))
        # Then the very next read has the change (no waiting for the invalidation's delivery)
        assert client.get("/whoami").text == f"user{n}"
    assert near.hits > hits  # the loop did read near copies in between
    # And an outside delete (a logout elsewhere) is seen at once too
    store_client.delete(key)
    assert client.get("/whoami").text == "nobody"


def test_a_lost_tracking_connection_sends_every_read_to_the_store(app, store_client, embedded_store) -> None:
    # Given a session read from the near cache
    client = app.test_client()
    client.post("/login/alice")
    key = session_key(app, client)
    read_near(app, client, "alice")
    tracker = app.session_interface.near.tracker  # type: ignore[attr-defined]
    # When its tracking connection is killed and the session changes right after
    store_client.client_kill_filter(_id=tracker.client_id)
    store_client.hset(key, "user", msgpack.packb("bob"))
    # Then the next read has the change, and near reads resume once tracking is back
    assert client.get("/whoami").text == "bob"
    read_near(app, client, "bob")


def app_response(response: Any) -> int:
    assert "Traceback" not in response.text
    return int(response.status_code)


def test_status_section(app: Flask) -> None:
    state = get_state(app)
    assert state.status()["sessions"] == {"app": "sessions_app", "serializer": "msgpack", "merge": False,
                                       "breaker": "closed", "near_hits": 0, "near_entries": 0, "tracking": False}
