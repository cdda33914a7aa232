"""The embedded balancer's side towards the nodes: pooled keep-alive HTTP/1.1 connections.

A general HTTP client (aiohttp's ``ClientSession``) builds a URL, a header multidict and a
request object per request, then parses and decodes the response into more of them: that was
about half of the balancer's CPU per request (bench/README.md, issue 14). A proxy needs much less.
The request head is written as bytes built from the client's raw header lines (only hop-by-hop
headers and ``X-Forwarded-*`` are touched). The response is read by ``httptools`` (llhttp, Node's
parser, strict): how a body is framed is where a proxy gets desynchronised, so that is left to a
maintained parser, and an answer it refuses is a :class:`BadResponse` on a connection then
closed. Its head becomes (name, value) pairs, its body the pieces llhttp hands on, de-chunked.

Each connection is an :class:`asyncio.Protocol`: no stream objects, no task per request, one
timer per wait for the node. Idle connections are kept per node address, newest first, and
dropped once idle for ``keepalive`` seconds (well within the nodes' own idle timeout, so a node
never closes one just as a request is written on it; if it does, the request fails with
:class:`Disconnected` before any answer and the balancer's retry rules apply).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import cast

import httptools

from ..errors import ImmutantError

#: Largest response head (status line and headers) accepted from a node.
MAX_HEAD = 128 * 1024
#: Response body bytes buffered from a node before it is asked to wait (the client reads slowly).
HIGH_WATER = 256 * 1024
#: Request headers never forwarded (RFC 9110 7.6.1), plus Expect (answered by the balancer's
#: server) and the X-Forwarded-* headers, which the balancer writes itself.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"expect", b"proxy-connection"})
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"})
#: Response headers never relayed to the client (the same names, as the response head is read).
RESPONSE_HOP_BY_HOP = frozenset(name.decode() for name in HOP_BY_HOP)
#: The status line's fixed part (``HTTP/1.1 200 ``, CRLF) and a header line's (``: ``, CRLF),
#: counted towards :data:`MAX_HEAD` with what llhttp hands on.
_STATUS_LINE, _HEADER_LINE = 15, 4


class UpstreamError(ImmutantError):
    """A request to a node failed (internal: the balancer answers 502 or 504 for it)."""


class ConnectFailed(UpstreamError):
    """No connection to the node: nothing reached it."""


class Disconnected(UpstreamError):
    """The connection closed before any byte of an answer (a pooled one the node had closed, or
    the node died): the node may have started on the request."""


class UpstreamTimeout(UpstreamError):
    """The node was silent for longer than the read timeout."""


class BadResponse(UpstreamError):
    """The node's answer was malformed or cut short."""


def request_head(method: str, raw_path: str, raw_headers: tuple[tuple[bytes, bytes], ...], *, host: str,
                 remote: str, scheme: str, chunked: bool, default_host: str) -> bytes:
    """The request head sent to a node: the client's header lines as they came, less hop-by-hop
    ones; ``X-Forwarded-For`` and ``-Host`` get this hop appended to what earlier proxies said
    (joined into one line, last), ``X-Forwarded-Proto`` is this balancer's scheme (waitress
    refuses a list). ``chunked``: the body's length is unknown (the client chunked it)."""
    lines = [f"{method} {raw_path} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")]
    prior_for: list[bytes] = []
    prior_host: list[bytes] = []
    has_host = False
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP:
            continue
        if lowered in _FORWARDED:
            if lowered == b"x-forwarded-for":
                prior_for.append(value)
            elif lowered == b"x-forwarded-host":
                prior_host.append(value)
            continue
        if lowered == b"host":
            has_host = True
        lines.append(b"%s: %s\r\n" % (name, value))
    if not has_host:
        lines.append(f"Host: {default_host}\r\n".encode())
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    for name, prior, value in ((b"X-Forwarded-For", prior_for, remote.encode("utf-8", "surrogateescape")),
                               (b"X-Forwarded-Host", prior_host, host.encode("utf-8", "surrogateescape"))):
        lines.append(b"%s: %s\r\n" % (name, b", ".join([*prior, value])))
    lines.append(f"X-Forwarded-Proto: {scheme}\r\n\r\n".encode())
    return b"".join(lines)


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp: the state it leaves says why."""


class Connection(asyncio.Protocol):
    """One keep-alive connection to a node, carrying one request at a time. It is the protocol
    of its own ``httptools.HttpResponseParser`` (the ``on_*`` methods), which lives as long as
    the connection: llhttp reads one answer after another on it, 1xx ones included."""

    def __init__(self, pool: Pool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.reusable = False
        self._parser = httptools.HttpResponseParser(self)
        # The response in progress.
        self.status = 0
        self.reason = ""
        #: The response's headers, less hop-by-hop ones.
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self._reason = b""
        self._length: bytes | None = None  # the Content-Length header (llhttp allows one only)
        self._chunked = False  # Transfer-Encoding ends with chunked
        self._fed = 0  # bytes given to the parser before the final head was complete
        self._head_size = 0  # the head's size as llhttp hands it on (status line and headers)
        self._head_done = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._expect_body = True
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._keep_alive = True

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.pool._forget(self)
        if self._done or self._error is not None:
            pass
        elif self._head_done and self._length is None and not self._chunked:
            self._done = True  # no length and not chunked: the body ends where the connection does
        elif not self._head_done:
            self._error = (Disconnected if not self._fed else BadResponse)(
                f"the connection closed {'before an answer' if not self._fed else 'in the response head'}"
                + (f": {exc}" if exc else ""))
        else:
            self._error = BadResponse("the connection closed in the response body" + (f": {exc}" if exc else ""))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(Disconnected("the connection closed while the request was sent"))
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close: connection_lost tells the reader

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._done or self._error is not None:
            self._drop()  # bytes nobody asked for: never reuse this connection
            return
        if not self._head_done:
            self._fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._drop()  # a 101 (nothing asks for one): its answer is complete, what follows is not HTTP
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):  # a bug in a callback: not the node's fault
                self._fail(BadResponse(f"reading the response failed: {exc.__context__!r}"))
                return
            if self._error is not None:
                self._fail(self._error)
                return
            self._drop()  # the answer is complete (HEAD, or bytes after it): the rest is not read
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed response: {exc}"))
            return
        if not self._head_done:
            if self._fed > MAX_HEAD:
                self._fail(BadResponse(f"the response head is larger than {MAX_HEAD} bytes"))
            return  # no wake: a node dribbling its head must not restart the read timeout
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    # --- httptools.HttpResponseParser's callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:  # a second answer, or garbage, after the one asked for
            raise _Stop
        self.headers = []
        self._reason = b""
        self._length = None
        self._chunked = False
        self._head_size = _STATUS_LINE

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._head_size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer (after a chunked body): dropped
        self._head_size += len(name) + len(value) + _HEADER_LINE
        value = value.rstrip(b" \t")  # llhttp drops the leading whitespace only
        lowered = name.lower()
        if lowered == b"content-length":
            self._length = value
        elif lowered == b"transfer-encoding":
            self._chunked = value.lower().rsplit(b",", 1)[-1].strip(b" \t") == b"chunked"
        if lowered not in HOP_BY_HOP:
            self.headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if self._head_size > MAX_HEAD:
            self._error = BadResponse(f"the response head is larger than {MAX_HEAD} bytes")
            raise _Stop
        if 100 <= status < 200 and status != 101:
            return  # an interim answer: llhttp reads the real one next
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._error = BadResponse(f"malformed response: HTTP version {version!r}")
            raise _Stop
        self.status = status
        self.reason = self._reason.decode("utf-8", "surrogateescape")
        self._keep_alive = parser.should_keep_alive()
        self._head_done = True
        if not self._expect_body:
            # HEAD: llhttp cannot know there is no body, so it is not asked to read one and the
            # connection is not reused (its bytes after the head would be in an unknown state).
            self._length = None
            self._chunked = False
            self._done = True
            raise _Stop
        if self._length is not None and status != 204 and status != 304:
            self.content_length = int(self._length)  # digits only: llhttp checked it

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self._head_done:  # else an interim answer ended: the real one follows
            self._finish()

    # --- the response -------------------------------------------------------------------------

    def _finish(self) -> None:
        self._done = True
        self.reusable = self._keep_alive and (self._sender is None or self._sender.done())

    def _drop(self) -> None:
        """Close the connection, never to be reused; what was read of the answer stays readable."""
        self.reusable = False
        self._keep_alive = False
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self.reusable = False
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timeout(self) -> None:
        self._fail(UpstreamTimeout(f"no answer within {self.pool.read_timeout:g}s"))

    async def _wait(self) -> None:
        self._waiter = waiter = self.loop.create_future()
        self._timer = self.loop.call_later(self.pool.read_timeout, self._on_timeout)
        try:
            await waiter
        finally:
            self._timer.cancel()
            self._waiter = None
    # --- used by the balancer ------------------------------------------------------------------

    async def send(self, head: bytes, body: AsyncIterator[bytes] | None, *, chunked: bool,
                   expect_body: bool) -> None:
        """Write the request (the body in a task of its own, as the node may answer before it has
        read it all) and wait for the response head: :attr:`status`, :attr:`headers`."""
        assert self.transport is not None
        self._expect_body = expect_body
        self.transport.write(head)
        if body is not None:
            self._sender = self.loop.create_task(self._send_body(body, chunked))
            self._sender.add_done_callback(_retrieve)
        while not self._head_done:
            sender = self._sender
            if sender is not None and sender.done() and not sender.cancelled() and sender.exception() is not None:
                raise UpstreamError(f"sending the request body failed: {sender.exception()!r}")
            if self._error is not None:
                raise self._error
            await self._wait()
        if self._error is not None:
            raise self._error  # the head came with a body llhttp refused: nothing is relayed yet, so a 502

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if transport.is_closing():
                    raise Disconnected("the connection closed while the request was sent")
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if self._writing_paused:
                    self._drain = self.loop.create_future()
                    await self._drain
            if chunked:
                transport.write(b"0\r\n\r\n")
        except BaseException:
            self.reusable = False
            transport.close()
            self._wake()
            raise
        if self._done:
            self.reusable = self._keep_alive

    async def read(self) -> bytes:
        """The whole response body."""
        parts = []
        while (chunk := await self.read_chunk()):
            parts.append(chunk)
        return b"".join(parts)

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrived (waiting for one); b"" at its end."""
        while not self._chunks:
            if self._done:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        data = self._chunks.popleft()  # as it was read (uvloop reads up to 256 KiB): no copy to join
        self._buffered -= len(data)
        if self._paused and self._buffered < HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def release(self) -> None:
        """Give the connection back: to the pool if the exchange ended cleanly, else closed."""
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            self.reusable = False
        self.pool._release(self)

    def _reset(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers = []
        self.content_length = None
        self._length = None
        self._chunked = False
        self._fed = 0
        self._head_done = False
        self._chunks.clear()  # what a client that left did not read of the last answer
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._done = False
        self._error = None
        self._sender = None
        self._drain = None
        self._keep_alive = True
        self.reusable = False


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a body sender's failure as seen: the request it belonged to has already answered it."""
    if not task.cancelled():
        task.exception()


class Pool:
    """Keep-alive connections to the nodes, at most ``limit`` in use at once."""

    def __init__(self, *, limit: int, keepalive: float, connect_timeout: float, read_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[str, list[Connection]] = {}
        self._open: set[Connection] = set()

    async def acquire(self, address: str) -> tuple[Connection, bool]:
        """A connection to ``address`` (``host:port``) and whether it was reused from the pool.
        Raises :class:`ConnectFailed` when a new one cannot be made."""
        await self._slots.acquire()
        try:
            idle = self._idle.get(address)
            now = time.monotonic()
            while idle:
                connection = idle.pop()
                if now - connection.idle_since < self.keepalive and connection.transport is not None \
                        and not connection.transport.is_closing():
                    connection._reset()
                    return connection, True
                connection.reusable = False
                if connection.transport is not None:
                    connection.transport.close()
            host, _, port = address.rpartition(":")
            try:
                _, connection = await asyncio.wait_for(
                    self.loop.create_connection(lambda: Connection(self, address), host.strip("[]"), int(port)),
                    self.connect_timeout)
            except TimeoutError:
                raise ConnectFailed(f"no connection within {self.connect_timeout:g}s") from None
            except (OSError, ValueError) as exc:
                raise ConnectFailed(str(exc) or type(exc).__name__) from None
            self._open.add(connection)
            return connection, False
        except BaseException:
            self._slots.release()
            raise

    def _release(self, connection: Connection) -> None:
        self._slots.release()
        transport = connection.transport
        if connection.reusable and transport is not None and not transport.is_closing():
            connection.idle_since = time.monotonic()
            self._idle.setdefault(connection.address, []).append(connection)
        elif transport is not None:
            transport.close()

    def _forget(self, connection: Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.address)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        for connection in list(self._open):
            if connection.transport is not None:
                connection.transport.close()
        self._idle.clear()
