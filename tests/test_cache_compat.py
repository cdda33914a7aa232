"""What Flask-Caching and cachelib users rely on, in every mode, on the real store: exact round
trips of what Flask-Caching stores (typed.py), fresh copies of objects Flask mutates, function
keys, cachelib's serializer slot, Flask-Caching's ``CACHE_*`` settings (backend.py), and a store
writer who cannot make a reader run code."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cachelib.serializers import JSONSerializer, SimpleSerializer
from flask import Flask, Response, abort
from flask_caching import Cache, CachedResponse
from markupsafe import Markup
from werkzeug.exceptions import MethodNotAllowed, NotFound

from flask_immutant import ImmutantConfigError, ImmutantExtension, caching, get_state
from flask_immutant.caching import typed
from flask_immutant.caching.caches import registry_for

from support import track, wait_until

MODES = ["distributed", "replicated", "invalidated", "local"]
BACKEND = "flask_immutant.caching.flask_caching_backend"


@pytest.fixture
def app(clean_env: None, immutant_home: Path, embedded_store: Any, cluster_name: str) -> Iterator[Flask]:
    app = Flask("cache_compat")
    track(app)
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name, IMMUTANT_CACHE=True)
    ImmutantExtension(app)
    try:
        yield app
    finally:
        registry_for(app).close()


def same_response(a: Response, b: Response) -> bool:
    return (type(a) is type(b) and a.status == b.status and a.get_data() == b.get_data()
            and list(a.headers) == list(b.headers))


def fc_cache(app: Flask, mode: str, **config: Any) -> Cache:
    return Cache(app, config={"CACHE_TYPE": BACKEND, "CACHE_IMMUTANT_MODE": mode, **config})


# --- exact round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_what_flask_caching_stores_comes_back_exactly(app: Flask, mode: str) -> None:
    cache = caching.cache("rt", mode=mode, app=app)
    # Given the values a @cached view or memoize hands to the backend
    plain = {"tuple": ("2", 200), "nested": [("a", (1, 2)), {"k": (None,)}], "set": {1, 2}, "frozen": frozenset("ab"),
             "markup": Markup("<b>x</b>"), "bytes": b"\x00\xff"}
    response = Response("body", 201, {"X-One": "1"}, mimetype="text/plain")
    cached = CachedResponse(Response("cached", 200), 30)
    with pytest.raises(NotFound) as raised:
        abort(404, "no such thing")
    not_found = raised.value
    not_allowed = MethodNotAllowed(valid_methods=["GET", "HEAD"])
    # When each is set and read back
    for key, value in plain.items():
        assert cache.set(key, value)
    for key, value in {"response": response, "cached": cached, "404": not_found, "405": not_allowed,
                       "view": (response, 202)}.items():
        assert cache.set(key, value)
    # Then each comes back of the same type and equal
    for key, value in plain.items():
        again = cache.get(key)
        assert again == value and type(again) is type(value), key
    assert cache.get("nested")[0][1] == (1, 2) and type(cache.get("nested")[1]["k"]) is tuple
    assert same_response(cache.get("response"), response)
    got = cache.get("cached")
    assert type(got) is CachedResponse and got.timeout == 30 and same_response(got, cached)
    got = cache.get("404")
    assert type(got) is NotFound and got.code == 404 and got.description == "no such thing"
    got = cache.get("405")
    assert type(got) is MethodNotAllowed and got.get_response().headers["Allow"] == "GET, HEAD"
    body, status = cache.get("view")
    assert status == 202 and same_response(body, response)


@pytest.mark.parametrize("mode", ["invalidated", "local"])
def test_a_response_kept_in_process_is_a_fresh_copy_on_every_hit(app: Flask, mode: str) -> None:
    cache = caching.cache("fresh", mode=mode, app=app)
    if mode == "invalidated":
        assert cache.tracking()  # type: ignore[attr-defined]
    cache.set("page", Response("hello"))
    if mode == "invalidated":  # the entry is in the near cache once our own write's invalidation is in
        wait_until(lambda: cache.get("page") is not None and cache.describe()["near_hits"] >= 1)
    # Given one request's hit that Flask then changes (a session cookie, a header)
    first = cache.get("page")
    first.set_cookie("session", "user-a")
    # When the next request hits the same entry (from the process, not the store)
    second = cache.get("page")
    # Then it does not carry the first one's changes
    assert "Set-Cookie" not in second.headers and second.get_data() == b"hello"
    if mode == "invalidated":
        assert cache.describe()["near_hits"] >= 3  # both reads were near hits


@pytest.mark.parametrize("mode", MODES)
def test_a_function_is_a_key_as_with_cachelibs_redis_backend(app: Flask, mode: str) -> None:
    def my_key() -> str:
        return "bacon"

    cache = caching.cache("fn", mode=mode, app=app)
    assert cache.set(my_key, "sausages") and cache.get(my_key) == "sausages"
    assert cache.has(my_key) and cache.delete(my_key) and cache.get(my_key) is None


def test_values_outside_the_closed_set_are_refused_not_lost(app: Flask) -> None:
    cache = caching.cache("refused", app=app)

    class Custom(NotFound):
        pass

    for value in (object(), Custom(), Response(iter([b"streamed"]))):
        with pytest.raises(TypeError):
            cache.set("k", value)


# --- cachelib's serializer slot ---------------------------------------------------------------


class CountingSerializer(SimpleSerializer):
    def __init__(self) -> None:
        self.dumped = self.loaded = 0

    def dumps(self, value: Any, protocol: Any = None) -> bytes:
        self.dumped += 1
        return super().dumps(value)  # type: ignore[return-value]

    def loads(self, bvalue: bytes) -> Any:
        self.loaded += 1
        return super().loads(bvalue)


@pytest.mark.parametrize("mode", MODES)
def test_cache_serializer_is_honoured_in_every_mode(app: Flask, mode: str) -> None:
    # Given CACHE_SERIALIZER set, as Flask-Caching documents it
    serializer = CountingSerializer()
    app.config["CACHE_SERIALIZER"] = serializer
    cache = fc_cache(app, mode)
    # When a value is set and read
    with app.app_context():
        assert cache.cache.serializer is serializer
        cache.set("hi", {"a": [1]})
        assert cache.get("hi") == {"a": [1]}
    # Then it went through that serializer
    assert serializer.dumped == 1 and serializer.loaded == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_cachelib_json_serializer_can_be_injected(app: Flask, mode: str) -> None:
    cache = registry_for(app).instance("json", mode=mode)
    cache.serializer = JSONSerializer()
    assert cache.set("k", {"a": 1}) and cache.get("k") == {"a": 1}


# --- Flask-Caching's settings -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_flask_caching_settings_are_honoured(app: Flask, mode: str) -> None:
    cache = fc_cache(app, mode, CACHE_DEFAULT_TIMEOUT=45, CACHE_KEY_PREFIX="site1_", CACHE_THRESHOLD=3,
                     CACHE_IGNORE_ERRORS=True, CACHE_OPTIONS={"idle": 20})
    with app.app_context():
        backend = cache.cache
        cache.set("k", 1)
    assert backend.ttl == 45 and backend.default_timeout == 45 and backend.idle == 20
    # CACHE_THRESHOLD bounds the local cache only, as it bounds cachelib's SimpleCache and not RedisCache
    assert backend.max_entries == (3 if mode == "local" else None)
    assert backend.key_prefix == "site1_" and backend.ignore_delete_many_errors
    if mode != "local":  # the prefix is part of the key in the named cache, as cachelib's key_prefix is
        assert registry_for(app).instance("flask-caching", mode=mode).get("site1_k") == 1


def test_clear_with_a_key_prefix_clears_only_that_prefix(app: Flask) -> None:
    one = fc_cache(app, "distributed", CACHE_KEY_PREFIX="one_")
    two = fc_cache(app, "distributed", CACHE_KEY_PREFIX="two_")
    with app.app_context():
        one.set("k", 1)
        two.set("k", 2)
        assert one.clear()
        assert one.get("k") is None and two.get("k") == 2


@pytest.mark.parametrize(("config", "named"), [
    ({"CACHE_ARGS": ["x"]}, "CACHE_ARGS"),
    ({"CACHE_REDIS_URL": "redis://elsewhere"}, "CACHE_REDIS_URL"),
    ({"CACHE_MEMCACHED_SERVERS": ["127.0.0.1:11211"]}, "CACHE_MEMCACHED_SERVERS"),
    ({"CACHE_DIR": "/tmp/x"}, "CACHE_DIR"),
    ({"CACHE_OPTIONS": {"host": "x"}}, "CACHE_OPTIONS['host']"),
    ({"CACHE_KEY_PREFIX": lambda: "p"}, "CACHE_KEY_PREFIX"),
    ({"CACHE_THRESHOLD": -1}, "CACHE_THRESHOLD"),
    ({"CACHE_IMMUTANT_MODE": "clustered"}, "CACHE_IMMUTANT_MODE"),
])
def test_settings_it_cannot_honour_are_refused_by_name(app: Flask, config: dict[str, Any], named: str) -> None:
    with pytest.raises(ImmutantConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        fc_cache(app, "distributed", **config)


def test_the_backend_needs_the_cache_feature_on(clean_env: None, immutant_home: Path, cluster_name: str) -> None:
    app = track(Flask("off"))
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name)
    ImmutantExtension(app)
    with pytest.raises(ImmutantConfigError, match="IMMUTANT_CACHE = True"):
        Cache(app, config={"CACHE_TYPE": BACKEND})


# --- a cached view, served from the cache ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cached_views_are_served_identically_from_a_hit(app: Flask, mode: str) -> None:
    cache = fc_cache(app, mode)
    calls: list[str] = []

    @app.route("/tuple")
    @cache.cached(60)
    def as_tuple() -> Any:
        calls.append("tuple")
        return "2", 201

    @app.route("/cached-response")
    @cache.cached(60)
    def as_cached_response() -> Any:
        calls.append("cached")
        return CachedResponse(Response("dynamic ttl", headers={"X-Kind": "cached"}), 30)

    @app.route("/missing")
    @cache.cached(60)
    def missing() -> Any:
        calls.append("missing")
        abort(404, "no such thing")

    client = app.test_client()
    for path in ("/tuple", "/cached-response", "/missing"):
        first, second = client.get(path), client.get(path)
        assert (first.status_code, first.get_data(), first.headers.get("X-Kind")) == \
               (second.status_code, second.get_data(), second.headers.get("X-Kind")), path
    assert client.get("/tuple").get_data() == b"2" and client.get("/tuple").status_code == 201
    assert b"no such thing" in client.get("/missing").get_data()
    assert calls == ["tuple", "cached", "missing"]


# --- a store writer ---------------------------------------------------------------------------

RAN: list[str] = []


class Exploit:
    def __reduce__(self) -> Any:
        return (RAN.append, ("pwned",))


def planted_values() -> list[bytes]:
    """Entries a store writer might plant: each must read as a miss and run nothing."""
    ext = msgpack.ExtType
    pack = msgpack.packb
    return [
        pack(ext(99, b"")),  # an unknown extension
        pack(ext(typed.RESPONSE, pack(["builtins.eval", "200 OK", [], b"", None]))),  # a class it may not name
        pack(ext(typed.RESPONSE, pack(["flask", 200, [], "not bytes", None]))),  # wrong field types
        pack(ext(typed.HTTP_EXCEPTION, pack(["Exploit", {}]))),  # not a Werkzeug exception
        pack(ext(typed.HTTP_EXCEPTION, pack(["NotFound", {"__class__": "x", "get_response": 1}]))),
        pack(ext(typed.TUPLE, pickle.dumps(Exploit()))),  # a pickle inside an extension
        b"\xc7" + b"\xff" * 8,  # truncated
        pack(ext(typed.TUPLE, b"\x91" * 100_000)),  # deep nesting
    ]


@pytest.mark.parametrize("mode", ["distributed", "invalidated"])
def test_a_store_writer_cannot_make_a_reader_run_code(app: Flask, store_client: Any, mode: str, caplog) -> None:
    cache = caching.cache("planted", mode=mode, app=app)
    keys = get_state(app).keys
    for number, raw in enumerate(planted_values()):
        # Given someone who can write to Redis plants an entry
        store_client.set(keys.cache_entry("planted", f"k{number}"), (b"\x00", b"\x03")[number % 2] + raw)
        # When the app reads it, Then it is a miss with a warning, and nothing ran
        with caplog.at_level(logging.WARNING, "flask_immutant.caching"):
            assert cache.get(f"k{number}") is None, number
    assert RAN == []
    assert caplog.text.count("not valid msgpack") == len(planted_values())


def test_typed_entries_have_their_own_header_and_plain_ones_still_read(app: Flask, store_client: Any) -> None:
    cache = caching.cache("upgrade", app=app)
    keys = get_state(app).keys
    # Given an entry written now, and one written by the previous release (plain msgpack)
    cache.set("new", ("body", 200))
    store_client.set(keys.cache_entry("upgrade", "old"), b"\x00" + msgpack.packb(["body", 200]))
    # Then the new one is tagged, so an older node mid rolling upgrade reads a miss, not a list
    assert store_client.get(keys.cache_entry("upgrade", "new"))[:1] == b"\x03"
    # And both read back here
    assert cache.get("new") == ("body", 200) and cache.get("old") == ["body", 200]
