"""Sentinel failovers noticed at once: clients drop their connections to a demoted primary.

redis-py asks the Sentinels for the primary only when it (re)connects. A command in flight to a
primary cut off by a partition waits out its reply timeout and redis-py's retries first (consumers
resumed 7-12 s after the promotion in the multi-host tests). The Sentinels announce every
promotion on their ``+switch-master`` channel: one watcher per process and Sentinel service
listens there and shuts down the socket of every connection still to another server. A command
waiting on one wakes with a connection error, an idle one is found broken when next taken from its
pool, and either reconnects, which asks the Sentinels and reaches the new primary. (Only the
socket is shut down, by the thread that watches: closing a connection another thread is reading
breaks redis-py's parser with a ValueError instead of a connection error.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

import redis
from redis.connection import SSLConnection
from redis.sentinel import SentinelManagedConnection

from ..loops import Loop

log = logging.getLogger("flask_immutant.store")

#: The Sentinel channel announcing a promotion: ``<service> <old ip> <old port> <new ip> <new port>``.
SWITCH_CHANNEL = "+switch-master"
#: Seconds between PINGs on the watcher's Sentinel connection, and its connect/reply timeout.
PING_INTERVAL = 0.5
#: Seconds of silence (no message, no PONG) after which the watcher moves to the next Sentinel.
SILENCE = 2.0

_lock = threading.Lock()
_watches: dict[tuple[tuple[tuple[str, int], ...], str], FailoverWatch] = {}
_connections: weakref.WeakSet[InterruptibleConnection] = weakref.WeakSet()


class InterruptibleConnection(SentinelManagedConnection):
    """redis-py's Sentinel-managed connection, known to the watchers once connected, so a
    promotion can interrupt it, and reconnecting through the Sentinels whenever it reconnects.
    It reads redis-py's ``_sock`` (contract: tests/test_store.py, a command in flight to a lost
    primary is answered by the promoted replica)."""

    def connect_to(self, address: tuple[str, int]) -> None:
        super().connect_to(address)  # type: ignore[no-untyped-call]  # redis-py's is unannotated
        with _lock:
            _connections.add(self)

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Reconnect through the Sentinels. redis-py 8 reconnects a connection that a command's
        retry disconnected at its last address (``connect_check_health``), the lost primary's."""
        if self._sock is None:
            self.connect()  # type: ignore[no-untyped-call]  # redis-py's is unannotated
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]  # as above

    def interrupt(self) -> None:
        """Shut the socket down: a read waiting on it ends, its owner reconnects."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class InterruptibleSSLConnection(InterruptibleConnection, SSLConnection):
    pass


def watch(pool: redis.ConnectionPool, sentinels: list[tuple[str, int]], service: str,
          sentinel_kwargs: dict[str, Any]) -> None:
    """Watch for promotions for ``service`` while ``pool`` (of :class:`InterruptibleConnection`) is open."""
    key = (tuple(sentinels), service)
    with _lock:
        current = _watches.get(key)
        if current is None or current.pid != os.getpid():  # none yet, or inherited through fork
            current = _watches[key] = FailoverWatch(sentinels, service, sentinel_kwargs)
        current.pools.add(pool)
        current.start()


def unwatch(pool: redis.ConnectionPool) -> None:
    """Stop watching for ``pool``; a watch with no pool left stops and closes its connection."""
    idle = []
    with _lock:
        for key, current in list(_watches.items()):
            current.pools.discard(pool)
            if not current.pools:
                idle.append(_watches.pop(key))
    for current in idle:
        current.stop()


class FailoverWatch:
    """Subscribed to ``+switch-master`` on one Sentinel at a time; moves to the next one when
    its Sentinel falls silent, and on each new subscription compares the primary with the last
    one known, so a promotion announced while it was moving is not missed."""

    def __init__(self, sentinels: list[tuple[str, int]], service: str, sentinel_kwargs: dict[str, Any]) -> None:
        self.sentinels = list(sentinels)
        self.service = service
        self.kwargs = {**sentinel_kwargs, "socket_timeout": PING_INTERVAL, "socket_connect_timeout": PING_INTERVAL}
        self.pid = os.getpid()
        self.pools: weakref.WeakSet[redis.ConnectionPool] = weakref.WeakSet()
        self.primary: tuple[str, int] | None = None
        self._index = 0
        self._client: redis.Redis | None = None
        self._pubsub: Any = None
        self._heard = self._pinged = 0.0
        self._loop = Loop("sentinel-watch", self._step, 0.0, on_error=self._move_on, backoff_cap=PING_INTERVAL)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._loop.start()

    def stop(self) -> None:
        self._loop.stop(timeout=PING_INTERVAL * 4)
        self._drop()

    def _step(self) -> float:
        if self._pubsub is None:
            self._subscribe()
        message = self._pubsub.get_message(timeout=PING_INTERVAL / 2)
        now = time.monotonic()
        if message is not None:
            self._heard = now
            if message.get("type") == "message":
                self._announced(message["data"])
        if now - self._pinged >= PING_INTERVAL:
            self._pubsub.ping()
            self._pinged = now
        if now - self._heard > SILENCE:
            raise redis.TimeoutError(f"Sentinel {self._address()} silent for {SILENCE:.1f}s")
        return 0.0

    def _subscribe(self) -> None:
        host, port = self.sentinels[self._index]
        self._client = redis.Redis(host=host, port=port, **self.kwargs)
        self._pubsub = self._client.pubsub()
        self._pubsub.subscribe(SWITCH_CHANNEL)
        address = self._client.sentinel_get_master_addr_by_name(self.service)
        self._client.connection_pool.disconnect(inuse_connections=False)  # one connection: the subscription
        self._heard = self._pinged = time.monotonic()
        if isinstance(address, (tuple, list)) and len(address) == 2:
            host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
            self._switched((host, int(address[1])))

    def _announced(self, data: Any) -> None:
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        parts = text.split()
        if len(parts) == 5 and parts[0] == self.service and parts[4].isdigit():
            self._switched((parts[3], int(parts[4])))

    def _switched(self, primary: tuple[str, int]) -> None:
        known, self.primary = self.primary, primary
        if known is None or known == primary:
            return
        log.warning("store: the Sentinels promoted %s:%d for %s; reconnecting", primary[0], primary[1], self.service)
        with _lock:
            connections = list(_connections)
        for connection in connections:
            if (connection.connection_pool.service_name == self.service
                    and (connection.host, int(connection.port)) != primary):
                connection.interrupt()

    def _address(self) -> str:
        host, port = self.sentinels[self._index]
        return f"{host}:{port}"

    def _move_on(self, _exc: BaseException | None = None) -> None:
        self._drop()
        self._index = (self._index + 1) % len(self.sentinels)

    def _drop(self) -> None:
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        for connection in (pubsub, client):
            if connection is not None:
                try:
                    connection.close()
                except (redis.RedisError, OSError):
                    pass
