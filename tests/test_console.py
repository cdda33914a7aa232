"""The console's server side on a real store: login, sessions, CSRF and Origin checks, actions
that change contexts, the status it serves, and `flask immutant console`'s loopback rule."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from flask_immutant.balancer.console import COOKIE, CSRF_HEADER, make_console_app
from flask_immutant.balancer.console_plugin import is_loopback
from flask_immutant.contexts import registry
from flask_immutant.extension import ImmutantState
from flask_immutant.keys import Keys

from support import run_flask

SECRET = "console-test-secret-0123456789"


@pytest.fixture
def state(immutant_home: Path, embedded_store: Any, cluster_name: str) -> ImmutantState:
    return ImmutantState.build(environ={
        "IMMUTANT_HOME": str(immutant_home), "IMMUTANT_CLUSTER": cluster_name, "IMMUTANT_SECRET": SECRET})


@pytest.fixture
def two_contexts(store_client: Any, cluster_name: str) -> Keys:
    keys = Keys(cluster_name)
    for node, port in (("a", 9001), ("b", 9002)):
        registry.publish(store_client, keys, registry.Context(node, "/", "app", "127.0.0.1", port, 80, 1, 0.0), 30)
    return keys


def run(state: ImmutantState, scenario: Callable[[TestClient[Any, Any]], Awaitable[None]],
        mount: str | None = None) -> None:
    """Run ``scenario`` against the console app (optionally mounted under ``mount``)."""
    async def main() -> None:
        app = make_console_app(state)
        if mount:
            outer = web.Application()
            outer.add_subapp(mount, app)
            app = outer
        async with TestClient(TestServer(app)) as client:
            await scenario(client)

    asyncio.run(main())


def origin(client: TestClient[Any, Any]) -> str:
    return str(client.make_url("/")).rstrip("/")


async def login(client: TestClient[Any, Any], prefix: str = "") -> str:
    response = await client.post(f"{prefix}/login", json={"token": SECRET}, headers={"Origin": origin(client)})
    assert response.status == 200
    return str((await response.json())["csrf"])


def states(store: Any, keys: Keys) -> dict[str, str]:
    return {c.node: c.state for c in registry.contexts(store, keys)}


def test_the_page_is_public_but_its_data_needs_the_secret(state):
    async def scenario(client: TestClient[Any, Any]) -> None:
        # Given the console, When the page shell is fetched, Then it comes with a strict CSP
        page = await client.get("/")
        assert page.status == 200 and "console.js" in await page.text()
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"
        # But the status needs a login, and a wrong secret gets none
        assert (await client.get("/api/status")).status == 401
        wrong = await client.post("/login", json={"token": "guess"}, headers={"Origin": origin(client)})
        assert wrong.status == 403 and COOKIE not in wrong.cookies
        assert (await client.get("/api/session")).status == 200
        assert (await (await client.get("/api/session")).json()) == {"authenticated": False}

    run(state, scenario)


def test_login_sets_a_strict_httponly_cookie_and_shows_the_cluster(state, two_contexts, cluster_name):
    async def scenario(client: TestClient[Any, Any]) -> None:
        response = await client.post("/login", json={"token": SECRET}, headers={"Origin": origin(client)})
        assert response.status == 200
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/;" in cookie
        csrf = (await response.json())["csrf"]
        session = await (await client.get("/api/session")).json()
        assert session["authenticated"] and session["csrf"] == csrf
        body = await (await client.get("/api/status")).json()
        document = body["status"]
        assert document["cluster"] == cluster_name
        assert [(c["node"], c["state"], c["load"]) for c in document["contexts"]] == [
            ("a", "ENABLED", 80), ("b", "ENABLED", 80)]
        for section in ("members", "store", "deployments", "daemons", "queues", "jobs"):
            assert section in document

    run(state, scenario)


def test_an_action_changes_the_context_state_in_the_store(state, two_contexts, store_client):
    async def scenario(client: TestClient[Any, Any]) -> None:
        csrf = await login(client)
        # When node a's context is disabled
        response = await client.post("/api/control", json={"state": "DISABLED", "node": "a", "context_path": "/"},
                                     headers={CSRF_HEADER: csrf, "Origin": origin(client)})
        assert response.status == 200, await response.text()
        # Then the store says so, and so does the console's next status
        assert states(store_client, two_contexts) == {"a": "DISABLED", "b": "ENABLED"}
        document = (await (await client.get("/api/status")).json())["status"]
        assert {c["node"]: c["state"] for c in document["contexts"]} == {"a": "DISABLED", "b": "ENABLED"}
        # And a node-wide stop, then enabling everything, work too
        await client.post("/api/control", json={"state": "STOPPED", "node": "b"},
                          headers={CSRF_HEADER: csrf, "Origin": origin(client)})
        assert states(store_client, two_contexts) == {"a": "DISABLED", "b": "STOPPED"}
        await client.post("/api/control", json={"state": "ENABLED"},
                          headers={CSRF_HEADER: csrf, "Origin": origin(client)})
        assert states(store_client, two_contexts) == {"a": "ENABLED", "b": "ENABLED"}

    run(state, scenario)


def test_actions_without_a_good_csrf_token_and_origin_are_refused(state, two_contexts, store_client):
    async def scenario(client: TestClient[Any, Any]) -> None:
        body = {"state": "STOPPED", "node": "a"}
        # No session at all
        assert (await client.post("/api/control", json=body, headers={"Origin": origin(client)})).status == 401
        csrf = await login(client)
        refused = [
            {"Origin": origin(client)},  # no CSRF token
            {"Origin": origin(client), CSRF_HEADER: "0" * len(csrf)},  # a wrong one
            {"Origin": "http://evil.example", CSRF_HEADER: csrf},  # another origin
            {CSRF_HEADER: csrf},  # no Origin nor Referer
            {"Origin": origin(client), CSRF_HEADER: csrf, "Sec-Fetch-Site": "cross-site"},
        ]
        for headers in refused:
            response = await client.post("/api/control", json=body, headers=headers)
            assert response.status == 403, headers
        # A login from another origin is refused as well (login CSRF)
        response = await client.post("/login", json={"token": SECRET}, headers={"Origin": "http://evil.example"})
        assert response.status == 403
        # A form post (no preflight cross-site) is not accepted either
        response = await client.post("/api/control", data={"state": "STOPPED"},
                                     headers={"Origin": origin(client), CSRF_HEADER: csrf})
        assert response.status == 415
        assert states(store_client, two_contexts) == {"a": "ENABLED", "b": "ENABLED"}
        # A Referer of the same origin stands in for a missing Origin
        response = await client.post("/api/control", json=body,
                                     headers={"Referer": origin(client) + "/", CSRF_HEADER: csrf})
        assert response.status == 200
        assert states(store_client, two_contexts)["a"] == "STOPPED"

    run(state, scenario)


def test_forged_or_expired_cookies_are_refused(state, two_contexts):
    async def scenario(client: TestClient[Any, Any]) -> None:
        csrf = await login(client)
        assert (await client.get("/api/status")).status == 200
        value = next(c.value for c in client.session.cookie_jar if c.key == COOKIE)
        expires, nonce, mac = value.split(".")
        for forged in (f"{int(time.time()) + 10**6}.{nonce}.{mac}",  # extended expiry
                       f"{int(time.time()) - 1}.{nonce}.{mac}",  # expired (and unsigned)
                       f"{expires}.{nonce}.{'0' * len(mac)}", "garbage"):
            client.session.cookie_jar.clear()
            cookie = {"Cookie": f"{COOKIE}={forged}"}
            assert (await client.get("/api/status", headers=cookie)).status == 401
            response = await client.post("/api/control", json={"state": "STOPPED"},
                                         headers={"Origin": origin(client), CSRF_HEADER: csrf, **cookie})
            assert response.status == 401

    run(state, scenario)


def test_a_bearer_token_works_for_scripts_and_a_bad_one_is_refused(state, two_contexts, store_client):
    async def scenario(client: TestClient[Any, Any]) -> None:
        bad = await client.post("/api/control", json={"state": "STOPPED"}, headers={"Authorization": "Bearer nope"})
        assert bad.status == 403
        assert (await client.get("/api/status", headers={"Authorization": "Bearer nope"})).status == 403
        good = await client.post("/api/control", json={"state": "DISABLED", "context_path": "/"},
                                 headers={"Authorization": f"Bearer {SECRET}"})
        assert good.status == 200
        assert states(store_client, two_contexts) == {"a": "DISABLED", "b": "DISABLED"}
        response = await client.get("/api/status", headers={"Authorization": f"Bearer {SECRET}"})
        assert response.status == 200

    run(state, scenario)


def test_bad_action_bodies_are_400s(state, two_contexts):
    async def scenario(client: TestClient[Any, Any]) -> None:
        csrf = await login(client)
        headers = {"Origin": origin(client), CSRF_HEADER: csrf}
        for body in ({"state": "PAUSED"}, {"state": "STOPPED", "node": "a|b"},
                     {"state": "STOPPED", "context_path": "no-slash"}, ["STOPPED"]):
            response = await client.post("/api/control", json=body, headers=headers)
            assert response.status == 400, body

    run(state, scenario)


def test_mounted_under_a_prefix_urls_and_cookie_stay_inside_it(state, two_contexts, store_client):
    async def scenario(client: TestClient[Any, Any]) -> None:
        bare = await client.get("/_immutant", allow_redirects=False)
        assert bare.status == 302 and bare.headers["Location"] == "/_immutant/"
        assert (await client.get("/_immutant/console.js")).status == 200
        response = await client.post("/_immutant/login", json={"token": SECRET}, headers={"Origin": origin(client)})
        assert "Path=/_immutant/" in response.headers["Set-Cookie"]
        csrf = (await response.json())["csrf"]
        response = await client.post("/_immutant/api/control", json={"state": "STOPPED", "node": "b"},
                                     headers={"Origin": origin(client), CSRF_HEADER: csrf})
        assert response.status == 200
        assert states(store_client, two_contexts)["b"] == "STOPPED"
        # Logging out drops the cookie
        await client.post("/_immutant/logout", json={}, headers={"Origin": origin(client), CSRF_HEADER: csrf})
        assert (await client.get("/_immutant/api/status")).status == 401

    run(state, scenario, mount="/_immutant/")


def test_status_is_one_snapshot_for_pollers_within_cache_for(state, two_contexts, monkeypatch):
    calls = []
    real = ImmutantState.status

    def counting(self: ImmutantState) -> dict[str, Any]:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(ImmutantState, "status", counting)

    async def scenario(client: TestClient[Any, Any]) -> None:
        await login(client)
        responses = await asyncio.gather(*(client.get("/api/status") for _ in range(5)))
        assert {r.status for r in responses} == {200}
        assert len(calls) == 1

    run(state, scenario)


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_the_console_refuses_a_remote_host_without_allow_remote(node_env):
    result = run_flask(["immutant", "console", "--host", "0.0.0.0"], node_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: --host 0.0.0.0 is not a loopback address; the console controls the cluster, so add "
        "--allow-remote to serve it there (with TLS in front)"]


def test_history_serves_the_samples_and_events_of_the_past_minutes(state, two_contexts, store_client):
    from flask_immutant.balancer.history import Sampler

    # Given one sample taken by a node's sampler, a ctl action from the page, and garbage in the history
    sampler = Sampler(state, every=3600)  # one slot for the whole test
    sampler.step()
    sampler.step()  # the same slot: no second sample
    store_client.xadd(state.keys.history, {"sample": "[not a sample"})

    async def scenario(client: TestClient[Any, Any]) -> None:
        # Without a login it is refused; a bad window is a 400 naming the allowed range
        assert (await client.get("/api/history")).status == 401
        bearer = {"Authorization": f"Bearer {SECRET}"}
        bad = await client.get("/api/history?minutes=999", headers=bearer)
        assert bad.status == 400 and "minutes: expected 1-60" in (await bad.json())["error"]
        csrf = await login(client)
        response = await client.post("/api/control", json={"state": "DISABLED", "node": "b", "context_path": None},
                                     headers={"Origin": origin(client), CSRF_HEADER: csrf})
        assert response.status == 200
        history = await (await client.get("/api/history?minutes=5")).json()
        # Then the sample shows each node's load factor, the event is there, the garbage is named
        (sample,) = history["samples"]
        assert sample["nodes"] == {"a": 80, "b": 80} and sample["queues"] == {}
        assert history["now"] - 60 < sample["t"] <= history["now"]
        (event,) = history["events"]
        assert event["kind"] == "ctl.action" and event["fields"]["scope_node"] == "b"
        assert event["fields"]["by"].startswith("console (")
        assert any("skipped the history sample" in w for w in history["warnings"])

    run(state, scenario)
