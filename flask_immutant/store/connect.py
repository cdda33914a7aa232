"""Redis clients from ``IMMUTANT_REDIS_URL``: redis, rediss (TLS), unix sockets and Sentinel.

redis-py parses the first three itself (AUTH, db and TLS options come from the URL); Sentinel
has no URL form in redis-py, so ``redis+sentinel://[user:password@]host:port[,host:port]/service[/db]``
is parsed here and handed to :class:`redis.sentinel.Sentinel`.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..errors import StoreUnavailableError
from . import failover
from .driver import driver_options
from .embedded import EmbeddedStore

#: Seconds to wait for a reply before calling the store unreachable.
SOCKET_TIMEOUT = 5.0
#: Seconds to wait for a TCP connection. Short, because redis-py nests its retries (the command's
#: and the connection's: 3 x 3 attempts), and a primary cut off by a partition never refuses: with
#: the reply timeout here, nodes hung for about 35 s before asking the Sentinels again.
SOCKET_CONNECT_TIMEOUT = 1.0
#: Retries of a failed command. redis-py's default backs off for seconds, longer than a
#: heartbeat interval; callers here retry on their own schedule, so retry briefly.
RETRIES = 2
RETRY_BACKOFF = (0.05, 0.25)  # base and cap, seconds
#: Connections one client's pool may open. A runtime holds one per blocking consumer (two per
#: destination on the Redis broker), per worker thread and per background loop, so the need grows
#: with the app; redis-py 8 caps a pool at 100 and then raises ``MaxConnectionsError``, which
#: stopped a runtime listening on about 40 destinations. As redis-py before 8: the store's
#: ``maxclients`` (10,000 by default) is the limit that matters.
MAX_CONNECTIONS = 2**31 - 1


def client_from_url(url: str, **options: Any) -> redis.Redis:
    """A redis-py client for ``url``; ``options`` are passed to the connection pool."""
    options.setdefault("socket_timeout", SOCKET_TIMEOUT)
    options.setdefault("socket_connect_timeout", SOCKET_CONNECT_TIMEOUT)
    options.setdefault("health_check_interval", 10)
    options.setdefault("max_connections", MAX_CONNECTIONS)
    options.setdefault("retry", Retry(EqualJitterBackoff(cap=RETRY_BACKOFF[1], base=RETRY_BACKOFF[0]), RETRIES))
    options = {**driver_options(url, options), **options}
    scheme = urlsplit(url).scheme
    if scheme.endswith("+sentinel"):
        return _sentinel_client(url, **options)
    return redis.Redis.from_url(url, **options)


def _sentinel_client(url: str, **options: Any) -> redis.Redis:
    parts = urlsplit(url)
    # netloc is "[user:password@]h1:p1,h2:p2": split credentials off before the host list.
    credentials, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        hostname, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
        hosts.append((hostname or "localhost", int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    service = path[0]
    db = int(path[1]) if len(path) > 1 else 0
    auth = {"username": unquote(username) or None, "password": unquote(password) or None}
    if parts.scheme.startswith("rediss"):
        options["ssl"] = True
    sentinel_kwargs = {**auth, **_timeouts(options), **driver_options(url, options)}
    options["connection_class"] = failover.InterruptibleSSLConnection if options.get("ssl") else \
        failover.InterruptibleConnection
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **auth, **options)
    client: SentinelManagedRedis = sentinel.master_for(service, db=db, redis_class=SentinelManagedRedis)
    client.sentinel_manager = sentinel
    failover.watch(client.connection_pool, hosts, service, sentinel_kwargs)
    return client


class SentinelManagedRedis(redis.Redis):
    """A client of the primary a Sentinel names, whose connections are dropped as soon as the
    Sentinels announce a new primary (failover.py). redis-py's ``close()`` leaves the connections
    to the Sentinels open (one per Sentinel asked); this one closes them too."""

    sentinel_manager: Sentinel | None = None

    def close(self) -> None:
        failover.unwatch(self.connection_pool)
        super().close()
        if self.sentinel_manager is not None:
            for client in self.sentinel_manager.sentinels:
                close_quietly(client)


def _timeouts(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in ("socket_timeout", "socket_connect_timeout") if k in options}


@contextlib.contextmanager
def existing_store(settings: Mapping[str, Any]) -> Iterator[redis.Redis]:
    """A client for a command or a status call: it never starts the embedded store (asking
    for status must not leave a server behind) and is closed afterwards."""
    client = client_from_url(store_url(settings, start=False))
    try:
        yield client
    finally:
        client.close()


def close_quietly(connection: Any) -> None:
    """Close a client or pub/sub connection that may already be broken (the store went away)."""
    with contextlib.suppress(redis.RedisError, OSError):
        connection.close()


class Subscription:
    """The pub/sub subscription of a background loop: opened on first use, dropped after an error
    (pass :meth:`drop` as the ``Loop``'s ``on_error``) and opened again by the next step.

    A wait for a message ends as soon as :meth:`interrupt` is called (the owner is stopping), not
    when its timeout runs out: stopping a node must not wait out the listening loops' timeouts."""

    def __init__(self, store: redis.Redis, *channels: str) -> None:
        self.store = store
        self.channels = channels
        self._pubsub: Any = None
        self._interrupted = threading.Event()

    def open(self) -> Any:
        """The pub/sub connection, subscribing first if there is none."""
        if self._pubsub is None:
            pubsub = self.store.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(*self.channels)
            except BaseException:
                close_quietly(pubsub)
                raise
            self._pubsub = pubsub
        return self._pubsub

    def get_message(self, timeout: float) -> Any:
        """The next message, or None after ``timeout`` seconds or once :meth:`interrupt` was called."""
        pubsub = self.open()
        deadline = time.monotonic() + timeout
        while not self._interrupted.is_set():
            message = pubsub.get_message(timeout=0)  # one already read, or readable now
            if message is not None:
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._interrupted.is_set():
                return None
            if not self._wait_readable(pubsub, remaining):
                return None
        return None

    def interrupt(self) -> None:
        """End the wait of :meth:`get_message` now, and every later one at once: the owner stops.
        The socket is shut down, not closed (closing a connection another thread reads breaks
        redis-py's parser; failover.py does the same); :meth:`drop` closes it afterwards."""
        self._interrupted.set()
        pubsub = self._pubsub
        sock = getattr(getattr(pubsub, "connection", None), "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def drop(self, _exc: BaseException | None = None) -> None:
        if self._pubsub is not None:
            close_quietly(self._pubsub)
        self._pubsub = None

    @staticmethod
    def _wait_readable(pubsub: Any, timeout: float) -> bool:
        """Wait until the subscription's socket is readable (True) or ``timeout`` passes (False).
        Reads redis-py's ``_sock`` (as failover.py does); where there is none, redis-py waits."""
        connection = pubsub.connection
        try:
            if connection.can_read(timeout=0):  # buffered by redis-py's parser: never wait for the socket
                return True
        except (redis.RedisError, OSError):
            return True  # broken: the next get_message reconnects or raises, as redis-py does
        sock = getattr(connection, "_sock", None)
        if sock is None:
            return bool(connection.can_read(timeout=timeout))
        # A selector (epoll, kqueue), not select(): select refuses a descriptor above 1023, which a
        # busy balancer or runtime reaches.
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(sock, selectors.EVENT_READ)
                return bool(selector.select(timeout))
        except (OSError, ValueError):
            return True  # closed meanwhile: let get_message find out


def describe_url(url: str) -> str:
    """``url`` with any password masked, for logs and the first line of ``run``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def store_url(settings: Mapping[str, Any], *, start: bool) -> str:
    """The effective store URL: ``IMMUTANT_REDIS_URL``, or the embedded store's socket.

    ``start=True`` starts the embedded store when it is not running (a node does this);
    ``start=False`` raises :class:`StoreUnavailableError` instead (status commands do this,
    so asking for status never leaves a server behind).
    """
    url: str | None = settings["IMMUTANT_REDIS_URL"]
    if url:
        return url
    embedded = EmbeddedStore(settings["IMMUTANT_HOME"])
    if start:
        return embedded.ensure_running()
    if not embedded.is_running():
        raise StoreUnavailableError(
            f"no cluster store is running under {embedded.home}: start a node with "
            "`flask immutant run`, or set IMMUTANT_REDIS_URL"
        )
    return embedded.url
