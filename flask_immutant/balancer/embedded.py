"""The embedded balancer: ``flask immutant balancer`` on a developer's box.

An aiohttp server in front of a pool of keep-alive connections to the nodes (:mod:`.upstream`,
which writes the client's header lines through as bytes). Request and response bodies are
streamed chunk by chunk with back-pressure both ways, so a large upload or a slow client holds a
few buffers, never a whole body. Which backend serves a request is decided by
:mod:`.routing` (the same rules HAProxy is configured for); the table comes from a
:class:`.watch.TableWatcher`. The management console is mounted at ``/_immutant/`` when
:mod:`.console` is available.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from ..metrics import definitions as metrics
from ..metrics.http import METRICS_PATH, allowed, forwarding, refusal, reserved
from ..metrics.process import enable, render
from . import routing, upstream
from .watch import Table, TableWatcher

if TYPE_CHECKING:
    import redis

    from ..state import ImmutantState

log = logging.getLogger("flask_immutant.balancer")

#: Bytes read or written at a time while streaming a body.
CHUNK = 64 * 1024
#: Seconds to wait for a TCP connection to a backend before trying another.
CONNECT_TIMEOUT = 2.0
#: Seconds a backend may stay silent while a response is awaited or streamed.
READ_TIMEOUT = 300.0
#: Seconds a backend that refused a connection is skipped by new requests (unless none is left).
QUARANTINE = 1.0
#: Where the console is mounted.
CONSOLE_PREFIX = "/_immutant/"

class _Body:
    """A request body streamed to a backend, remembering whether any of it was read: a body
    partly sent cannot be sent again to another backend. It must arrive by ``deadline``
    (monotonic), with no silence longer than ``idle`` seconds, and be at most ``limit`` bytes;
    otherwise it stops and ``refusal`` holds the answer the client gets instead (408 or 413)."""

    def __init__(self, content: aiohttp.StreamReader, *, deadline: float, idle: float, limit: int) -> None:
        self.content = content
        self.deadline = deadline
        self.idle = idle
        self.limit = limit
        self.consumed = False
        self.refusal: web.Response | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        while True:
            wait = min(self.idle, self.deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise TimeoutError
                chunk = await asyncio.wait_for(self.content.readany(), timeout=wait)
            except TimeoutError:
                self.refusal = _error(408, "the request body did not arrive in time")
                raise _Refused from None
            if not chunk:
                return
            received += len(chunk)
            if received > self.limit:
                self.refusal = _error(413, f"the request body is larger than {self.limit} bytes")
                raise _Refused
            self.consumed = True
            yield chunk


class _Refused(Exception):
    """The client's request body broke a limit; :attr:`_Body.refusal` is the answer."""


class EmbeddedBalancer:
    """Routes HTTP requests to the cluster's contexts; see docs/balancer.md."""

    def __init__(self, state: ImmutantState, *, store: redis.Redis | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 pool_size: int | None = None, quarantine: float = QUARANTINE, console: bool = True) -> None:
        self.state = state
        self.store = store if store is not None else state.store
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        settings = state.settings
        self.pool_size = pool_size if pool_size is not None else settings["IMMUTANT_HTTP_CONNECTION_LIMIT"]
        #: Client side: silence allowed on a connection, time to send a request body, its size.
        self.client_idle = settings["IMMUTANT_HTTP_IDLE_TIMEOUT"]
        self.client_read_timeout = settings["IMMUTANT_HTTP_READ_TIMEOUT"]
        self.max_body = settings["IMMUTANT_HTTP_MAX_BODY"]
        self.quarantine = quarantine
        self.console = console
        self.table: Table = {}
        self._refused: dict[str, float] = {}  # backend address -> monotonic time it may be tried again
        self._pool: upstream.Pool | None = None
        self.watcher = TableWatcher(self.store, state.keys, self._on_tick)
        if settings["IMMUTANT_METRICS"]:
            enable()

    # --- the table --------------------------------------------------------------------------

    def _on_tick(self, table: Table, changed: bool) -> None:
        if changed:
            # A weight follows every load wobble of an idle node: INFO only when routes change.
            routes = _describe(table, weights=False)
            (log.info if routes != _describe(self.table, weights=False) else log.debug)(
                "routing table: %s", _describe(table))
            gone = _backends(self.table) - _backends(table)
            self.table = table
            for node, context_path in gone:  # its series go with it: names of pods that come and go pile up
                for metric in (metrics.BALANCER_REQUESTS, metrics.BALANCER_SECONDS, metrics.BALANCER_RETRIES):
                    metric.forget(backend=node, context=context_path)

    # --- the aiohttp application -------------------------------------------------------------

    def make_app(self) -> web.Application:
        # The path-only rule is checked first thing in each handler here, and by a middleware in
        # the console's sub-application: a middleware on every forwarded request costs two calls.
        app = web.Application(handler_args={"max_field_size": 65536})
        if self.console:
            self._mount_console(app)
        app.router.add_route("*", METRICS_PATH, self.metrics)  # never forwarded: a node would trust our address
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    def _mount_console(self, app: web.Application) -> None:
        try:
            from .console import make_console_app
        except ImportError as exc:
            log.debug("no console to mount at %s (%s)", CONSOLE_PREFIX, exc)
            return
        console = make_console_app(self.state)
        console.middlewares.insert(0, _paths_only)
        app.add_subapp(CONSOLE_PREFIX, console)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        # Reuse a pooled connection only well within the nodes' idle timeout, so they never close it first.
        self._pool = upstream.Pool(limit=self.pool_size, keepalive=min(15.0, self.client_idle / 2),
                                   connect_timeout=self.connect_timeout, read_timeout=self.read_timeout)
        await asyncio.to_thread(self.watcher.refresh)
        self.watcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.watcher.stop)
            self._pool.close()

    # --- one request -------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        pool = self._pool
        assert pool is not None
        raw_path = request.raw_path
        if not raw_path.startswith("/"):
            return _not_a_path()
        if reserved(raw_path):  # however spelt: a node would take our address for the client's
            return _error(404, "flask-immutant's own paths (/-/immutant/) are not forwarded")
        cookie = request.headers.get("Cookie")
        route = request.cookies.get(routing.ROUTE_COOKIE) if cookie and routing.ROUTE_COOKIE in cookie else None
        method = request.method
        retriable = method in routing.IDEMPOTENT_METHODS
        if request.content_length is not None and request.content_length > self.max_body:
            return _error(413, f"the request body is larger than {self.max_body} bytes")
        body = _Body(request.content, deadline=time.monotonic() + self.client_read_timeout, idle=self.client_idle,
                     limit=self.max_body) if request.body_exists else None
        chunked = body is not None and request.content_length is None
        path = request.path
        tried: set[str] = set()
        disconnects: dict[str, int] = {}
        failures: list[str] = []
        started = time.monotonic()
        heads: dict[str, bytes] = {}
        while True:
            decision = self._decide(path, route, tried)
            backend = decision.backend
            if backend is None:
                if failures:
                    return _error(502, f"{'; '.join(failures)}; {decision.reason}")
                return _error(503, decision.reason)
            head = heads.get(backend.address)
            if head is None:  # the same bytes for every backend but for a missing Host
                head = heads[backend.address] = upstream.request_head(
                    method, raw_path, request.raw_headers, host=request.host, remote=request.remote or "",
                    scheme=request.scheme, chunked=chunked, default_host=backend.address)
            connection: upstream.Connection | None = None
            try:
                connection, _reused = await pool.acquire(backend.address)
                await connection.send(head, body.chunks() if body is not None else None, chunked=chunked,
                                      expect_body=method != "HEAD")
            except upstream.ConnectFailed as exc:
                # Nothing reached the backend: it is down or unreachable.
                self._refused[backend.address] = time.monotonic() + self.quarantine
                tried.add(backend.node)
                failures.append(f"node {backend.node} ({backend.address}) refused the connection: {_reason(exc)}")
                log.info("%s %s: %s", method, request.path_qs, failures[-1])
                if not (body and body.consumed):  # nothing was sent: safe for any method, as HAProxy does
                    metrics.BALANCER_RETRIES.inc(backend.node, decision.context_path or "")
                    continue
                return _error(502, failures[-1])
            except upstream.Disconnected as exc:
                assert connection is not None
                connection.release()
                if body is not None and body.refusal is not None:
                    return body.refusal
                # A pooled connection died under the request (the backend closed it, or died).
                disconnects[backend.node] = disconnects.get(backend.node, 0) + 1
                if disconnects[backend.node] >= 2:
                    tried.add(backend.node)
                failures.append(f"node {backend.node} ({backend.address}) closed the connection: {_reason(exc)}")
                if retriable and not (body and body.consumed):
                    metrics.BALANCER_RETRIES.inc(backend.node, decision.context_path or "")
                    continue
                return _error(502, failures[-1])
            except upstream.UpstreamTimeout:
                assert connection is not None
                connection.release()
                return _error(504, f"node {backend.node} ({backend.address}) did not answer within "
                                   f"{self.read_timeout:g}s")
            except BaseException as exc:
                if connection is not None:
                    connection.release()
                if not isinstance(exc, upstream.UpstreamError):
                    raise
                if body is not None and body.refusal is not None:
                    return body.refusal  # the client's body broke a limit
                return _error(502, f"node {backend.node} ({backend.address}): {_reason(exc)}")
            metrics.BALANCER_SECONDS.observe(time.monotonic() - started, backend.node, decision.context_path or "")
            metrics.BALANCER_REQUESTS.inc(backend.node, decision.context_path or "", f"{connection.status // 100}xx")
            try:
                return await self._relay(request, connection, decision, body)
            finally:
                connection.release()

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """This balancer's own metrics (``IMMUTANT_METRICS``), for loopback and ``IMMUTANT_METRICS_ALLOW``."""
        if not request.raw_path.startswith("/"):
            return _not_a_path()
        if not self.state.settings["IMMUTANT_METRICS"]:
            return _error(404, "metrics are off on this balancer (IMMUTANT_METRICS)")
        if any(forwarding(name) for name in request.headers):  # a proxy in front: its address is not the client's
            return _error(403, "metrics are not served through a proxy (the request has X-Forwarded-* headers)")
        if not allowed(request.remote or "", self.state.settings["IMMUTANT_METRICS_ALLOW"]):
            return _error(403, refusal(request.remote or ""))
        body, content_type = await asyncio.to_thread(render)
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    def _decide(self, path: str, route: str | None, tried: set[str]) -> routing.Decision:
        table = self.table
        if not self._refused:
            return routing.decide(table, path, route, tried)
        now = time.monotonic()
        refused = {address for address, until in self._refused.items() if until > now}
        if not refused:
            self._refused.clear()
            return routing.decide(table, path, route, tried)
        context_path = routing.match_context(table, path)
        skipped = {b.node for b in table.get(context_path or "", []) if b.address in refused}
        decision = routing.decide(table, path, route, tried | skipped)
        if decision.backend is None and skipped - tried:
            decision = routing.decide(table, path, route, tried)  # refused lately, but nothing else is left
        return decision

    async def _relay(self, request: web.Request, connection: upstream.Connection, decision: routing.Decision,
                     body: _Body | None) -> web.StreamResponse:
        backend = decision.backend
        assert backend is not None
        length = connection.content_length
        small = (length is not None and length <= CHUNK and request.method != "HEAD"
                 and connection.status not in (204, 304))
        headers = connection.headers  # less hop-by-hop ones; a small body's length is the one read
        if decision.set_route:
            headers.append(("Set-Cookie", _route_cookie(decision.set_route)))
        if small:
            # The whole body fits one chunk: read it, then answer in one write (status line,
            # headers and body together) instead of streaming it in three.
            try:
                data = await connection.read()
            except upstream.UpstreamError as exc:
                if body is not None and body.refusal is not None:
                    return body.refusal  # the client's body broke a limit while the node answered
                return _error(502, f"node {backend.node} ({backend.address}) failed while answering: "
                                   f"{_reason(exc)}")
            if body is not None and body.refusal is not None:
                return body.refusal
            return web.Response(status=connection.status, reason=connection.reason, body=data, headers=headers)
        response = web.StreamResponse(status=connection.status, reason=connection.reason, headers=headers)
        try:
            await response.prepare(request)
            if request.method != "HEAD":
                while chunk := await connection.read_chunk():
                    await response.write(chunk)
            await response.write_eof()
        except upstream.UpstreamError as exc:
            # The backend failed mid-response: the status line is gone, so cut the connection.
            log.warning("%s %s: node %s failed while answering: %s", request.method, request.path_qs,
                        backend.node, _reason(exc))
            if request.transport is not None:
                request.transport.close()
        except ConnectionResetError:
            pass  # the client left
        return response

    # --- running it --------------------------------------------------------------------------

    async def serve(self, host: str, port: int, ready: asyncio.Event | None = None,
                    stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or SIGINT/SIGTERM when it is not given)."""
        from ..server.http import raise_descriptor_limit
        from .parse_errors import log_parse_errors_briefly

        log_parse_errors_briefly()
        raise_descriptor_limit(2 * self.pool_size)  # a client's and a node's connection per request
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False,
                               keepalive_timeout=self.client_idle)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, backlog=1024)
            await site.start()
            bound = runner.addresses[0]
            self.address = (bound[0], bound[1])
            log.info("balancer listening on http://%s:%d", bound[0], bound[1])
            if stop is None:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(signum, stop.set)
            if ready is not None:
                ready.set()
            await stop.wait()
        finally:
            await runner.cleanup()

    def run(self, host: str, port: int) -> None:
        """Serve until SIGINT/SIGTERM, on uvloop's event loop where it is installed."""
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(self.serve(host, port))


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop if it is installed (a dependency on Linux and macOS): its libuv transports
    cost aiohttp's proxying about half the CPU per request of asyncio's default loop
    (bench/balancer.py); None (asyncio's own) otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@web.middleware
async def _paths_only(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Refuse a request target that is not a path (absolute-form ``http://host/...``): this is a
    reverse proxy, never a forward one, and the target would otherwise be spliced into a URL."""
    if not request.raw_path.startswith("/"):
        return _not_a_path()
    return await handler(request)


def _not_a_path() -> web.Response:
    return _error(400, "the request target must be a path, such as /index.html")


@functools.lru_cache(maxsize=4096)
def _route_cookie(node: str) -> str:
    """The Set-Cookie value binding a session to ``node``, as aiohttp's ``set_cookie`` writes it
    (made once per node, not per response)."""
    response = web.StreamResponse()
    response.set_cookie(routing.ROUTE_COOKIE, node, path="/", httponly=True, samesite="Lax")
    return response.cookies[routing.ROUTE_COOKIE].output(header="")[1:]


def _error(status: int, message: str) -> web.Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.Response(status=status, text=f"flask-immutant balancer: {message}\n", headers=headers)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.split("\n")[0]


def _backends(table: Table) -> set[tuple[str, str]]:
    """(node, context path) of every server in ``table``: the balancer metrics' label pairs."""
    return {(server.node, context_path) for context_path, servers in table.items() for server in servers}


def _describe(table: Table, weights: bool = True) -> str:
    if not table:
        return "empty"
    return "; ".join(f"{path} -> " + ", ".join(f"{b.node}@{b.address} {b.state}" + (f" w{b.weight}" if weights else "")
                                               for b in sorted(backends, key=lambda b: (b.node, b.address)))
                     for path, backends in sorted(table.items()))

