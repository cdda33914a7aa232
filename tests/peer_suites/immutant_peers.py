"""pytest plugin for the peers' own suites (loaded with ``-p immutant_peers`` in a subprocess).

It points their tests at the cluster cache in the mode named by ``IMMUTANT_PEER_MODE``, on the
real store under ``IMMUTANT_HOME``, with a cluster of its own per test so that no test sees
another's entries; and it deselects the tests listed in ``not_applicable.txt`` (failing the run
if a listed test no longer exists, so the list cannot go stale).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask

from flask_immutant import ImmutantExtension, caching
from flask_immutant.caching import local
from flask_immutant.caching.caches import registry_for

MODE = os.environ.get("IMMUTANT_PEER_MODE", "distributed")
SUITE = os.environ.get("IMMUTANT_PEER_SUITE", "")
NOT_APPLICABLE = Path(__file__).with_name("not_applicable.txt")
BACKEND = "flask_immutant.caching.flask_caching_backend"


def not_applicable(suite: str, mode: str) -> dict[str, str]:
    """``{test id: reason}`` of the tests of ``suite`` that cannot apply in ``mode``.

    Lines: ``<suite> <test id> [modes=a,b] -- <reason>``; ``#`` starts a comment. A test id of
    ``fixture:NAME`` means every test that uses fixture NAME."""
    found: dict[str, str] = {}
    for line in NOT_APPLICABLE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, reason = line.partition(" -- ")
        parts = spec.split()
        if parts[0] != suite:
            continue
        modes = next((part[6:].split(",") for part in parts[2:] if part.startswith("modes=")), None)
        if modes is None or mode in modes:
            found[parts[1]] = reason.strip()
    return found


def immutant_app(config: dict[str, Any] | None = None) -> Flask:
    """An app with the cluster cache on, on the shared store, in a cluster of its own."""
    app = Flask(f"peer_{uuid.uuid4().hex[:8]}")
    app.config.update(IMMUTANT_CACHE=True, IMMUTANT_HOME=os.environ["IMMUTANT_HOME"],
                      IMMUTANT_CLUSTER=f"peer{uuid.uuid4().hex[:10]}", **(config or {}))
    ImmutantExtension(app)
    return app


#: Apps being closed in the background (an invalidated cache's tracker takes a moment to stop).
CLOSING: list[threading.Thread] = []


def close_later(app: Flask) -> None:
    closing = threading.Thread(target=close_app, args=(app,), name="close-peer-app")
    closing.start()
    CLOSING.append(closing)


def pytest_sessionfinish() -> None:
    for closing in CLOSING:
        closing.join(10)


def close_app(app: Flask) -> None:
    state = app.extensions.get("immutant")
    if state is None:
        return
    if "caching" in state.features:
        registry_for(app).close()
    if "store" in vars(state):
        state.store.close()


def _join_cluster(app: Flask) -> None:
    app.config.update(IMMUTANT_CACHE=True, IMMUTANT_HOME=os.environ["IMMUTANT_HOME"],
                      IMMUTANT_CLUSTER=f"peer{uuid.uuid4().hex[:10]}", CACHE_TYPE=BACKEND, CACHE_IMMUTANT_MODE=MODE)
    ImmutantExtension(app)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Iterator[Any]:
    """Flask-Caching's ``app`` fixture: the same app, with our backend as its ``CACHE_TYPE``."""
    value = yield
    if fixturedef.argname == "app" and isinstance(value, Flask) and "immutant" not in value.extensions:
        _join_cluster(value)
        fixturedef.addfinalizer(lambda: close_later(value))
    elif fixturedef.argname == "clock" and MODE == "local":
        # Their fake clock drives cachelib.simple's expiry; let it drive the local cache's too.
        patch = pytest.MonkeyPatch()
        patch.setattr(local, "time", SimpleNamespace(monotonic=value, time=value))
        fixturedef.addfinalizer(patch.undo)
    return value


@pytest.fixture
def immutant_cache_factory() -> Iterator[Any]:
    """cachelib's ``cache_factory`` arguments -> a cluster cache in ``MODE`` (a fresh cluster per test)."""
    apps: list[Flask] = []

    def factory(default_timeout: int = 300, key_prefix: str | None = None,
                ignore_delete_many_errors: bool = True) -> caching.ClusterCache:
        app = immutant_app()
        apps.append(app)
        return registry_for(app).instance("peer", mode=MODE, ttl=default_timeout or None,
                                             key_prefix=key_prefix or "",
                                             ignore_delete_many_errors=ignore_delete_many_errors)

    try:
        yield factory
    finally:
        for app in apps:
            close_later(app)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    listed = not_applicable(SUITE, MODE)
    kept, dropped, seen = [], [], set()
    for item in items:
        match = next((test for test in listed if item.nodeid == test
                      or item.nodeid.startswith((test + "[", test + "::"))
                      or (test.startswith("fixture:") and test[8:] in getattr(item, "fixturenames", ()))), None)
        if match is None:
            kept.append(item)
        else:
            dropped.append(item)
            seen.add(match)
    stale = sorted(set(listed) - seen)
    if stale:
        raise pytest.UsageError(f"not_applicable.txt lists tests that {SUITE} does not have: {', '.join(stale)}")
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)


def pytest_report_header() -> str:
    return f"flask-immutant peer suite {SUITE!r} against the cluster cache, mode {MODE!r}"

