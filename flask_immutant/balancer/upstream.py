"""The embedded balancer's side towards the nodes: pooled keep-alive HTTP/1.1 connections.

A general HTTP client (aiohttp's ``ClientSession``) builds a URL, a header multidict and a
request object per request, then parses and decodes the response into more of them: that was
about half of the balancer's CPU per request (bench/README.md, issue 14). A proxy needs much less.
The request head is written as bytes built from the client's raw header lines (only hop-by-hop
headers and ``X-Forwarded-*`` are touched), the response head is parsed once into (name, value)
pairs, and the body is handed on as the bytes that arrived, de-chunked when the node chunked it.

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
#: Response headers that say how the body is framed or whether the connection stays open.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


class UpstreamError(Exception):
    """A request to a node failed."""


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


class Connection(asyncio.Protocol):
    """One keep-alive connection to a node, carrying one request at a time."""

    def __init__(self, pool: Pool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.reusable = False
        # The response in progress.
        self.status = 0
        self.reason = ""
        #: The response's headers, less hop-by-hop ones.
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self._head = bytearray()
        self._head_done = False
        self._framing = ""  # "none", "length", "chunked", "close"
        self._remaining = 0  # length: bytes left; chunked: bytes left of this chunk
        self._chunk_state = "size"  # chunked: "size", "data", "crlf", "trailers"
        self._raw = bytearray()  # chunked: bytes not yet decoded
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
        if self._head_done and self._framing == "close" and not self._done:
            self._done = True  # the body ends where the connection does
        elif not self._done and self._error is None and not self._head_done:
            self._error = (Disconnected if not self._head else BadResponse)(
                f"the connection closed {'before an answer' if not self._head else 'in the response head'}"
                + (f": {exc}" if exc else ""))
        elif not self._done and self._error is None and self._head_done:
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
            self.reusable = False  # bytes nobody asked for: never reuse this connection
            self._keep_alive = False
            if self.transport is not None:
                self.transport.close()
            return
        if not self._head_done:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD:
                    self._fail(BadResponse(f"the response head is larger than {MAX_HEAD} bytes"))
                return
            head, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
            try:
                interim = self._parse_head(head)
            except ValueError as exc:
                self._fail(BadResponse(f"malformed response head: {exc}"))
                return
            if interim:  # 1xx before the answer: drop it, keep reading
                self._head = bytearray()
                if rest:
                    self.data_received(rest)
                return
            self._head_done = True
            if self._framing == "none":
                self._finish()
            if rest:
                self._body(rest)
            self._wake()
            return
        self._body(data)

    # --- the response -------------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> bool:
        """Read a response head into :attr:`status`, :attr:`reason` and :attr:`headers` (less
        hop-by-hop ones) and choose how its body is framed; True for a 1xx to skip. Decoded once,
        as UTF-8 with surrogate escapes (what aiohttp's own parser does, so nothing changes)."""
        lines = head.decode("utf-8", "surrogateescape").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise ValueError(repr(lines[0][:100]))
        status = int(code)
        if 100 <= status < 200 and status != 101:
            return True
        headers: list[tuple[str, str]] = []
        lengths: set[str] = set()
        chunked = False
        coded = False
        keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name[-1] in " \t" or name[0] in " \t":
                raise ValueError(f"header line {line[:100]!r}")
            value = value.strip(" \t")
            lowered = name.lower()
            if lowered in _FRAMING:
                if lowered == "content-length":
                    lengths.add(value)
                elif lowered == "transfer-encoding":
                    coded = True
                    chunked = value.lower().rsplit(",", 1)[-1].strip() == "chunked"
                else:  # connection
                    tokens = {token.strip() for token in value.lower().split(",")}
                    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
            if lowered not in RESPONSE_HOP_BY_HOP:
                headers.append((name, value))
        self.status = status
        self.reason = reason
        self.headers = headers
        self._keep_alive = keep_alive
        if not self._expect_body or status in (204, 304) or status == 101:
            self._framing = "none"
        elif coded:
            self._framing = "chunked" if chunked else "close"
            self.headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        elif lengths:
            if len(lengths) > 1 or not all(length.isdigit() and length.isascii() for length in lengths):
                raise ValueError(f"Content-Length {sorted(lengths)!r}")
            self.content_length = self._remaining = int(lengths.pop())
            self._framing = "length"
            if self._remaining == 0:
                self._finish()
        else:
            self._framing = "close"
        return False

    def _body(self, data: bytes) -> None:
        framing = self._framing
        if framing == "length":
            if len(data) > self._remaining:
                self.reusable = self._keep_alive = False  # more than the length said: drop the excess
                data = data[:self._remaining]
            self._remaining -= len(data)
            self._push(data)
            if self._remaining == 0:
                self._finish()
        elif framing == "chunked":
            self._raw += data
            try:
                self._dechunk()
            except ValueError as exc:
                self._fail(BadResponse(f"malformed chunked body: {exc}"))
                return
        elif framing == "close":
            self._push(data)
        else:
            self.reusable = self._keep_alive = False
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _dechunk(self) -> None:
        raw = self._raw
        position = 0
        while not self._done:
            state = self._chunk_state
            if state == "data":
                take = min(self._remaining, len(raw) - position)
                if take:
                    self._push(bytes(raw[position:position + take]))
                    position += take
                    self._remaining -= take
                if self._remaining:
                    break
                self._chunk_state = "crlf"
                continue
            end = raw.find(b"\r\n", position)
            if end < 0:
                if len(raw) - position > 8192:
                    raise ValueError("a chunk size or trailer line longer than 8192 bytes")
                break
            line = bytes(raw[position:end])
            position = end + 2
            if state == "crlf":
                if line:
                    raise ValueError("no CRLF after a chunk")
                self._chunk_state = "size"
            elif state == "size":
                size = line.split(b";", 1)[0].strip()
                if not size or any(c not in b"0123456789abcdefABCDEF" for c in size):
                    raise ValueError(f"chunk size {line[:40]!r}")
                self._remaining = int(size, 16)
                self._chunk_state = "data" if self._remaining else "trailers"
            elif not line:  # "trailers": the empty line ends the body (trailers are dropped)
                self._finish()
        del raw[:position]
        if self._done and raw:
            self.reusable = self._keep_alive = False

    def _push(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)

    def _finish(self) -> None:
        self._done = True
        self.reusable = self._keep_alive and (self._sender is None or self._sender.done())

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
        self._head = bytearray()
        self._head_done = False
        self._framing = ""
        self._chunk_state = "size"
        self._raw = bytearray()
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
