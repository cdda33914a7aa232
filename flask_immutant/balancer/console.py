"""The management console: one page showing the cluster live, with context controls.

:func:`make_console_app` builds an aiohttp application that the embedded balancer mounts at
``/_immutant/`` and ``flask immutant console`` serves on its own (for HAProxy setups). Every URL
in it is relative, so it works under any prefix.

Security, in short (docs/console.md has the why):

- The page shell (HTML, JS, CSS) is public; every piece of data and every action needs the cluster
  secret, either exchanged once at ``login`` for a session cookie (HttpOnly, SameSite=Strict,
  scoped to the console's path) or sent as ``Authorization: Bearer <secret>`` by scripts.
- The session cookie is stateless: an expiry and a nonce signed with an HMAC of the secret, so
  any balancer process sharing the secret accepts it, and changing the secret logs everyone out.
- Actions made with the cookie are CSRF-checked: a per-session token (an HMAC of the session's
  nonce) in the ``X-CSRF-Token`` header, compared with :func:`hmac.compare_digest`, plus an
  ``Origin`` (or ``Referer``) that must be the console's own, and a JSON body.
- Blocking store calls run in a thread (:func:`asyncio.to_thread`), so the event loop never
  waits on Redis; one status snapshot is shared by every browser polling within ``cache_for``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
from aiohttp import web

from .. import names
from ..contexts import registry
from ..errors import ImmutantError

if TYPE_CHECKING:
    from ..state import ImmutantState

log = logging.getLogger("flask_immutant.balancer.console")

#: Name of the session cookie.
COOKIE = "immutant_console"
#: How long a console login lasts, in seconds.
SESSION_TTL = 8 * 3600
#: Every browser polling within this many seconds gets the same status snapshot.
CACHE_FOR = 0.5
#: The header that carries the CSRF token of a cookie session.
CSRF_HEADER = "X-CSRF-Token"

STATIC = ("console.html", "console.js", "console_history.js", "console.css")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

STATE_KEY: web.AppKey[ImmutantState] = web.AppKey("immutant_state")
CONSOLE_KEY: web.AppKey[Console] = web.AppKey("immutant_console")


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int


class Console:
    """The console's server side: the secret, the sessions it signs, the status it serves."""

    def __init__(self, state: ImmutantState, secret: bytes, *, cache_for: float = CACHE_FOR,
                 session_ttl: int = SESSION_TTL) -> None:
        self.state = state
        self.secret = secret
        self.cache_for = cache_for
        self.session_ttl = session_ttl
        self._mac_key = hashlib.sha256(b"flask-immutant console\0" + secret).digest()
        self._store: redis.Redis | None = None
        self._snapshot: tuple[float, int, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    # --- tokens and sessions --------------------------------------------------------------

    def token_ok(self, token: str) -> bool:
        return same_secret(token, self.secret)

    def _mac(self, purpose: str, *parts: str) -> str:
        message = "\0".join((purpose, *parts)).encode("utf-8", "surrogatepass")
        return hmac.new(self._mac_key, message, hashlib.sha256).hexdigest()

    def new_session(self) -> tuple[str, Session]:
        session = Session(secrets.token_urlsafe(24), int(time.time()) + self.session_ttl)
        value = f"{session.expires}.{session.nonce}"
        return f"{value}.{self._mac('session', value)}", session

    def session_from(self, cookie: str | None) -> Session | None:
        if not cookie or cookie.count(".") != 2:
            return None
        expires, nonce, mac = cookie.split(".")
        if not same_secret(mac, self._mac("session", f"{expires}.{nonce}")):
            return None
        if not (expires.isascii() and expires.isdigit()) or int(expires) < time.time():
            return None
        return Session(nonce, int(expires))

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.nonce)

    # --- the store, in a thread -------------------------------------------------------------

    def _client(self) -> redis.Redis:
        if self._store is None:
            from ..store import client_from_url, store_url

            self._store = client_from_url(store_url(self.state.settings, start=False))
        return self._store

    async def status(self) -> dict[str, Any]:
        """The ``status --json`` document, at most ``cache_for`` old, built in a thread."""
        async with self._lock:
            now = time.monotonic()
            if self._snapshot is None or now - self._snapshot[0] >= self.cache_for:
                document = await asyncio.to_thread(self.state.status)
                serial = self._snapshot[1] + 1 if self._snapshot else 1
                self._snapshot = (time.monotonic(), serial, document)
            return self._snapshot[2]

    async def history(self, minutes: int) -> dict[str, Any]:
        """The past ``minutes``: the cluster samples and the events, for the charts and timeline."""
        return await asyncio.to_thread(self._history, minutes)

    def _history(self, minutes: int) -> dict[str, Any]:
        from ..events import read as read_events
        from ..records import collecting
        from .history import SAMPLE_EVERY, read_history

        store = self._client()
        seconds, micros = store.time()
        now = seconds + micros / 1e6
        since = now - minutes * 60
        with collecting() as warnings:
            samples = read_history(store, self.state.keys, since)
            found = [e.to_dict() for e in read_events(store, self.state.keys, since)]
        return {"now": now, "minutes": minutes, "every": SAMPLE_EVERY, "samples": samples, "events": found,
                "warnings": warnings}

    def forget_status(self) -> None:
        self._snapshot = None

    async def control(self, state: str, node: str | None, context_path: str | None, by: str | None = None) -> None:
        await asyncio.to_thread(
            lambda: registry.set_control(self._client(), self.state.keys, state, node, context_path, by))
        self.forget_status()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


# --- request checks ---------------------------------------------------------------------------


def same_secret(given: str, expected: str | bytes) -> bool:
    """Constant-time comparison of a value a client sent with a secret. Headers may carry any
    bytes (aiohttp hands them over as surrogate escapes) and JSON lone surrogates: those are
    compared as the bytes they stand for, so they are merely unequal, never an error."""
    if isinstance(expected, str):
        expected = expected.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected)


def _own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _same_origin(request: web.Request) -> bool:
    """The request comes from a page of this console's own origin (CSRF's second check)."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if not referer:
            return False
        try:
            parts = urlsplit(referer)
        except ValueError:  # such as an unclosed IPv6 bracket
            return False
        origin = f"{parts.scheme}://{parts.netloc}"
    return same_secret(origin, _own_origin(request))


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _forbidden(reason: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=json.dumps({"error": reason}), content_type="application/json")


def _authorized(request: web.Request, *, action: bool) -> Session | None:
    """Let the request through or raise 401/403; returns its cookie session, if it used one.

    A bearer token needs no CSRF check: browsers never attach it on their own.
    """
    console = request.app[CONSOLE_KEY]
    bearer = _bearer(request)
    if bearer is not None:
        if not console.token_ok(bearer):
            raise _forbidden("bad token")
        return None
    session = console.session_from(request.cookies.get(COOKIE))
    if session is None:
        raise web.HTTPUnauthorized(text=json.dumps({"error": "log in with the cluster secret"}),
                                   content_type="application/json")
    if action:
        if not _same_origin(request):
            raise _forbidden("cross-origin request refused")
        token = request.headers.get(CSRF_HEADER, "")
        if not same_secret(token, console.csrf_token(session)):
            raise _forbidden("missing or bad CSRF token")
    return session


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text=json.dumps({"error": "send application/json"}),
                                           content_type="application/json")
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "expected a JSON object"}),
                                 content_type="application/json")
    return body


def _cookie_path(request: web.Request) -> str:
    """The console's own path (``/_immutant/`` when mounted there), so apps never see the cookie."""
    return request.path.rsplit("/", 1)[0] + "/"


# --- handlers ---------------------------------------------------------------------------------


def _static(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    body = resources.files(__package__).joinpath("console_static").joinpath(name).read_bytes()
    content_type = CONTENT_TYPES[name[name.rindex("."):]]

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    return handler


async def _root(request: web.Request) -> web.StreamResponse:
    """``/_immutant`` without its slash would break relative URLs: add it."""
    if not request.path.endswith("/"):
        raise web.HTTPFound(request.path + "/")
    return await request.app[_PAGE_KEY](request)


async def _login(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    if not _same_origin(request):
        raise _forbidden("cross-origin request refused")
    body = await _json_body(request)
    token = body.get("token")
    if not isinstance(token, str) or not console.token_ok(token.strip()):
        log.warning("console: failed login from %s", request.remote)
        raise _forbidden("wrong cluster secret")
    value, session = console.new_session()
    response = web.json_response({"csrf": console.csrf_token(session), "expires": session.expires})
    response.set_cookie(COOKIE, value, max_age=console.session_ttl, path=_cookie_path(request),
                        httponly=True, samesite="Strict", secure=request.secure)
    return response


async def _logout(request: web.Request) -> web.StreamResponse:
    _authorized(request, action=True)
    response = web.json_response({"ok": True})
    response.del_cookie(COOKIE, path=_cookie_path(request))
    return response


async def _session(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE_KEY]
    session = console.session_from(request.cookies.get(COOKIE))
    if session is None:
        return web.json_response({"authenticated": False})
    return web.json_response({"authenticated": True, "csrf": console.csrf_token(session),
                              "expires": session.expires})


async def _status(request: web.Request) -> web.StreamResponse:
    _authorized(request, action=False)
    try:
        document = await request.app[CONSOLE_KEY].status()
    except (ImmutantError, redis.RedisError) as exc:
        return web.json_response({"error": f"the cluster store did not answer: {exc}"}, status=503)
    return web.json_response({"status": document, "time": time.time(), "states": list(registry.STATES)})


#: Minutes of history the page may ask for.
HISTORY_MINUTES = (1, 60)


async def _history(request: web.Request) -> web.StreamResponse:
    _authorized(request, action=False)
    raw = request.query.get("minutes", "15")
    low, high = HISTORY_MINUTES
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"minutes: expected {low}-{high}, got {raw[:20]!r}"}),
                                 content_type="application/json")
    try:
        history = await request.app[CONSOLE_KEY].history(int(raw))
    except (ImmutantError, redis.RedisError) as exc:
        return web.json_response({"error": f"the cluster store did not answer: {exc}"}, status=503)
    return web.json_response(history)


async def _control(request: web.Request) -> web.StreamResponse:
    _authorized(request, action=True)
    body = await _json_body(request)
    state, node, context_path = body.get("state"), body.get("node") or None, body.get("context_path") or None
    problems = []
    if not isinstance(state, str) or state not in registry.STATES:
        problems.append(f"state: expected one of {', '.join(registry.STATES)}")
    for field, value, kind in (("node", node, names.name), ("context_path", context_path, names.context_path)):
        try:
            if value is not None:
                kind(value)
        except ValueError as exc:
            problems.append(f"{field}: expected {exc}")
    if problems:
        raise web.HTTPBadRequest(text=json.dumps({"error": "; ".join(problems)}), content_type="application/json")
    console = request.app[CONSOLE_KEY]
    try:
        await console.control(str(state), node, context_path, by=f"console ({request.remote})")
    except (ImmutantError, redis.RedisError) as exc:
        return web.json_response({"error": f"the cluster store did not answer: {exc}"}, status=503)
    log.info("console: %s node=%s context=%s (from %s)", state, node or "*", context_path or "*", request.remote)
    return web.json_response({"ok": True, "state": state, "node": node, "context_path": context_path})


@web.middleware
async def _headers(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


_PAGE_KEY: web.AppKey[Callable[[web.Request], Awaitable[web.StreamResponse]]] = web.AppKey("immutant_page")


def make_console_app(state: ImmutantState, *, secret: bytes | None = None,
                     cache_for: float = CACHE_FOR) -> web.Application:
    """The console for ``state``'s cluster; ``secret`` defaults to the cluster secret
    (``IMMUTANT_SECRET``, or the one generated into ``IMMUTANT_HOME/secret``)."""
    if secret is None:
        from ..deploy.records import cluster_secret

        secret = cluster_secret(state.settings)
    if not secret:
        raise ImmutantError("the console needs a cluster secret: set IMMUTANT_SECRET")
    console = Console(state, secret, cache_for=cache_for)
    app = web.Application(middlewares=[_headers])
    app[STATE_KEY] = state
    app[CONSOLE_KEY] = console
    app[_PAGE_KEY] = _static("console.html")
    app.router.add_get("", _root)
    app.router.add_get("/", _root)
    for name in STATIC[1:]:
        app.router.add_get(f"/{name}", _static(name))
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/api/session", _session)
    app.router.add_get("/api/status", _status)
    app.router.add_get("/api/history", _history)
    app.router.add_post("/api/control", _control)

    async def close(_app: web.Application) -> None:
        console.close()

    app.on_cleanup.append(close)
    return app
