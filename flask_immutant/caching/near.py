"""``mode="invalidated"``: the shared cache plus a near cache in each process, kept coherent by Redis.

Coherence comes from Redis server-assisted client-side caching (``CLIENT TRACKING``) in broadcast
mode: one connection per cache and process asks Redis to report every change of a key under the
cache's prefix, redirected to itself and read as ``__redis__:invalidate`` messages (RESP2, so it
works with the ordinary redis-py client). Redis sends those for *every* change of such a key —
our writes, other tools' writes, expiry, eviction, ``FLUSHALL`` — before the writer's reply.
docs/caching.md explains the choice over application-level pub/sub and over redis-py's own
RESP3 cache.

Reads that miss the near cache fill it only if no invalidation of that key arrived while the
read was in flight (the "caching in progress" race). (The session near cache also checks
``Tracker.settled`` before each near read; a cache does not: the check is a system call, which
would more than double the cost of a near hit.) While the tracking connection is down, the
near cache is empty and bypassed; a heartbeat PING detects a silent connection within
``HEARTBEAT`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import redis

from ..loops import Loop
from ..metrics import definitions as metrics
from .base import MISSING
from .shared import SharedCache, _Down
from .typed import MUTATED_BY_FLASK, Encoded

log = logging.getLogger("flask_immutant.caching")

#: Seconds between heartbeat PINGs on the tracking connection; a missing PONG after as long again
#: counts as a lost connection (the near cache is flushed and bypassed until it is back).
HEARTBEAT = 1.0
#: Near-cache size when the cache has no ``max_entries``.
NEAR_MAX_ENTRIES = 10_000
#: Longest pause between two reconnection attempts of the tracking connection.
RECONNECT_MAX = 2.0
INVALIDATE_CHANNEL = b"__redis__:invalidate"
#: What redis-py (8.x) adds to a TCP pool's connection settings for RESP3 maintenance
#: notifications; a RESP2 connection refuses them ("only supported with hiredis and RESP3
#: parsers") and tracking has no use for them.
RESP3_ONLY_SETTINGS = frozenset({
    "maint_notifications_config", "maint_notifications_pool_handler", "oss_cluster_maint_notifications_handler",
    "orig_host_address", "orig_socket_timeout", "orig_socket_connect_timeout",
})
INF = float("inf")


class NearCache:
    """Decoded values by Redis key, LRU-bounded, with the in-flight read protocol."""

    def __init__(self, max_entries: int, lru: bool) -> None:
        self.max_entries = max_entries
        self.lru = lru
        self._data: OrderedDict[str, tuple[Any, float, float]] = OrderedDict()
        self._pending: dict[str, list[int]] = {}  # key -> [generation, readers in flight]
        self._lock = threading.Lock()
        self._epoch = 0
        #: True while invalidations are being received; otherwise nothing is cached.
        self.healthy = False
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return MISSING
        value, expires, refresh = entry
        now = time.monotonic()
        if now >= expires or now >= refresh:
            return MISSING
        if self.lru:
            with self._lock, contextlib.suppress(KeyError):
                self._data.move_to_end(key)
        return value

    def begin(self, key: str) -> tuple[int, int]:
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = [0, 0]
            pending[1] += 1
            return pending[0], self._epoch

    def finish(self, key: str, token: tuple[int, int], value: Any, expires: float, refresh: float) -> None:
        with self._lock:
            pending = self._pending[key]
            pending[1] -= 1
            if pending[1] == 0:
                del self._pending[key]
            if value is MISSING or not self.healthy or (pending[0], self._epoch) != token:
                return
            self._data[key] = (value, expires, refresh)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def invalidate(self, keys: list[str]) -> None:
        with self._lock:
            self.invalidations += 1
            for key in keys:
                self._data.pop(key, None)
                pending = self._pending.get(key)
                if pending is not None:
                    pending[0] += 1

    def flush(self, healthy: bool | None = None) -> None:
        with self._lock:
            self._epoch += 1
            self._data.clear()
            if healthy is not None:
                self.healthy = healthy


class Tracker:
    """The thread that holds one tracking connection (``CLIENT TRACKING ... BCAST PREFIX prefix``)
    and applies its invalidations to ``near``. The caches of mode ``invalidated`` and the session
    near cache (``web/near.py``) each run one."""

    def __init__(self, name: str, client: Callable[[], redis.Redis], prefix: str, near: NearCache,
                 on_subscribed: Callable[[], None] | None = None, label: str | None = None) -> None:
        self.name = name
        #: What its invalidations are counted under in the metrics (``cache`` label).
        self.label = name if label is None else label
        self.client = client
        self.prefix = prefix
        self.near = near
        self.on_subscribed = on_subscribed
        self.stopping = threading.Event()
        self.subscribed = threading.Event()
        self._loop = Loop(name, self._track, 0.0, on_error=self._lost, stop_event=self.stopping,
                          backoff_cap=RECONNECT_MAX)
        self._conn: Any = None
        #: The tracking connection's ``CLIENT ID`` on the server (None until connected).
        self.client_id: int | None = None
        self._fd = -1
        self._pollers = threading.local()
        # True from the moment the thread may have taken bytes off the socket until it has applied
        # them and found nothing more to read (see ``settled``).
        self._reading = True

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 2.0) -> None:
        self.stopping.set()  # the thread notices within HEARTBEAT / 4 and closes its connection
        self.near.flush(healthy=False)
        self._loop.stop(timeout)

    def settled(self) -> bool:
        """True when no invalidation is waiting to be applied: none unread on the connection and
        none read but not yet applied. Redis writes a key's invalidation to this connection before
        it answers the write, so on one machine (loopback or a unix socket, where the bytes are in
        our socket when Redis's ``write`` returns) a write that has returned anywhere is either
        applied already or makes this False. Check it *before* looking a key up in the near cache."""
        fd = self._fd
        if fd < 0:
            return False
        mine = self._pollers  # one poll object per thread: a poll object refuses concurrent use
        poller = getattr(mine, "poller", None)
        if poller is None or mine.fd != fd:
            poller = mine.poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI)
            mine.fd = fd
        try:
            if poller.poll(0):  # readable, hung up or closed: not settled either way
                return False
        except OSError:
            return False
        return not self._reading

    def _lost(self, exc: BaseException) -> None:
        """Tracking broke: bypass the near cache until it is back (the loop logs and retries)."""
        self.subscribed.clear()
        self.near.flush(healthy=False)
        self._disconnect()

    def _disconnect(self) -> None:
        self._fd = -1
        self._reading = True
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.disconnect()
            self._conn = None

    def _track(self) -> None:
        conn = self._conn = tracking_connection(self.client())
        self._reading = True
        conn.connect()
        conn.send_command("CLIENT", "ID")
        self.client_id = client_id = conn.read_response()
        conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", self.prefix)
        conn.read_response()
        conn.send_command("SUBSCRIBE", INVALIDATE_CHANNEL)
        conn.read_response()
        # redis-py keeps its socket in ``_sock`` (no public accessor); waiting on it with poll()
        # rather than ``can_read`` leaves unread bytes visible to ``settled``.
        self._fd = conn._sock.fileno()
        waiter = select.poll()
        waiter.register(self._fd, select.POLLIN | select.POLLPRI)
        self.near.flush(healthy=True)
        self.subscribed.set()
        self._loop.mark_healthy()
        if self.on_subscribed is not None:
            self.on_subscribed()
        log.debug("tracking %s: %s* as client %s", self.name, self.prefix, client_id)
        last_ping = time.monotonic()
        awaiting_pong = False
        while not self.stopping.is_set():
            while conn.can_read(timeout=0):  # everything buffered or readable now, while marked reading
                self._handle(conn.read_response())
            self._reading = False
            if waiter.poll(HEARTBEAT / 4 * 1000):
                self._reading = True  # before a byte leaves the socket
            if awaiting_pong and self._pong:
                awaiting_pong = self._pong = False
            now = time.monotonic()
            if awaiting_pong and now - last_ping > HEARTBEAT:
                raise redis.TimeoutError(f"no reply to a heartbeat within {HEARTBEAT}s")
            if not awaiting_pong and now - last_ping >= HEARTBEAT:
                conn.send_command("PING")
                last_ping, awaiting_pong, self._pong = now, True, False
        self._disconnect()

    _pong = False

    def _handle(self, message: Any) -> None:
        if not isinstance(message, list) or not message:
            return
        kind = message[0]
        if kind == b"message" and message[1] == INVALIDATE_CHANNEL:
            metrics.CACHE_INVALIDATIONS.inc(self.label)
            keys = message[2]
            if keys is None:  # FLUSHDB / FLUSHALL
                self.near.flush()
            else:
                self.near.invalidate([key.decode() for key in keys])
        elif kind == b"pong":
            self._pong = True


def tracking_connection(client: redis.Redis) -> Any:
    """A new connection like those of ``client``'s pool, outside the pool, speaking RESP2:
    invalidations then arrive as ordinary pub/sub messages of the redirect target, and our own
    PINGs replace the health check, which subscribed mode does not answer."""
    pool: Any = client.connection_pool
    settings = {k: v for k, v in pool.connection_kwargs.items() if k not in RESP3_ONLY_SETTINGS}
    return pool.connection_class(**{**settings, "protocol": 2, "health_check_interval": 0})


class InvalidatedCache(SharedCache):
    mode = "invalidated"

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        self.near = NearCache(self.max_entries or NEAR_MAX_ENTRIES, lru=bool(self.max_entries))
        self.near_hits = 0
        self._tracker: Tracker | None = None
        self._tracker_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "near_hits": self.near_hits, "near_entries": len(self.near),
                "tracking": self.near.healthy}

    def tracking(self, timeout: float = 5.0) -> bool:
        """Start tracking if needed; whether invalidations are being received within ``timeout``."""
        return self._ensure_tracker().subscribed.wait(timeout)

    def _ensure_tracker(self) -> Tracker:
        tracker = self._tracker
        if tracker is None:
            with self._tracker_lock:
                if self._tracker is None:
                    self._tracker = Tracker(f"cache-{self.name}", lambda: self.client, self.prefix, self.near,
                                            on_subscribed=self.breaker.success, label=self.name)
                    self._tracker.start()
                tracker = self._tracker
        return tracker

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.stop()
            self._tracker = None
        super().close()

    # --- reads through the near cache -------------------------------------------------------

    def _fill(self, rkey: str, queue_read: Callable[[Any], Any], decode: Callable[[Any], Any],
              copies: bool = False) -> Any:
        """Read ``rkey`` from the store with its remaining TTL; keep it near unless it changed meanwhile.
        ``copies``: keep values Flask mutates as their bytes, so each hit decodes a fresh copy."""
        if self._tracker is None:
            self._ensure_tracker()
        token = self.near.begin(rkey)
        value: Any = MISSING
        kept: Any = MISSING
        expires = refresh = INF
        try:
            def op() -> list[Any]:
                pipe = self.client.pipeline(transaction=False)
                queue_read(pipe)
                pipe.pttl(rkey)
                return pipe.execute(raise_on_error=False)

            raw, pttl = self._call(op)
            value = kept = decode(raw)
            if copies and isinstance(value, MUTATED_BY_FLASK):
                kept = Encoded(raw)
            now = time.monotonic()
            if pttl is not None and pttl > 0:
                expires = now + pttl / 1000
            if self.idle_ms:
                refresh = now + self.idle_ms / 2000
            return value
        except _Down:
            return MISSING
        finally:
            self.near.finish(rkey, token, kept, expires, refresh)

    def _get(self, key: str) -> Any:
        rkey = self.rkey(key)
        value = self.near.get(rkey)
        if value is not MISSING:
            self.near_hits += 1
            metrics.CACHE_NEAR_HITS.inc(self.name)
            return self.decode(value.data) if type(value) is Encoded else value

        def read(pipe: Any) -> None:
            if self._scripted:
                self._scripts["cache_get"](keys=[rkey, self._index], args=[self.idle_ms, self._indexed], client=pipe)
            else:
                pipe.get(rkey)

        return self._fill(rkey, read, self.decode, copies=True)

    def _get_many(self, keys: list[str]) -> list[Any]:
        return [self._get(key) for key in keys]

    # --- writes go to the store, then drop the near copy ------------------------------------

    def _set(self, key: str, value: Any, ttl_ms: int, mode: str) -> Any:
        try:
            return super()._set(key, value, ttl_ms, mode)
        finally:
            self.near.invalidate([self.rkey(key)])

    def _delete(self, keys: list[str]) -> int:
        try:
            return super()._delete(keys)
        finally:
            self.near.invalidate([self.rkey(key) for key in keys])

    def _clear(self) -> bool:
        try:
            return super()._clear()
        finally:
            self.near.flush()

    def _incr(self, key: str, delta: int) -> int | None:
        try:
            return super()._incr(key, delta)
        finally:
            self.near.invalidate([self.rkey(key)])

    def _swap(self, key: str, fn: Callable[[Any], Any], ttl_ms: int, expect: Any) -> tuple[bool, Any]:
        try:
            return super()._swap(key, fn, ttl_ms, expect)
        finally:
            self.near.invalidate([self.rkey(key)])

    # --- memoize: a fresh result in the near cache costs no round trip ------------------------

    def _memo_read(self, key: str) -> tuple[Any, bool]:
        near = self.near.get(key)
        if near is not MISSING:
            fresh_until, value = near
            if fresh_until == 0 or time.time() * 1000 < fresh_until:
                self.near_hits += 1
                metrics.CACHE_NEAR_HITS.inc(self.name)
                return value, True
            return value, False

        def decode(raw: Any) -> Any:
            if raw is None or raw[:1] != b"\x02":
                return MISSING
            value = self.decode(raw[14:])
            return MISSING if value is MISSING else (int(raw[1:14]), value)

        entry = self._fill(key, lambda pipe: pipe.get(key), decode)
        if entry is MISSING:
            return MISSING, False
        fresh_until, value = entry
        return value, fresh_until == 0 or time.time() * 1000 < fresh_until

    def _memo_write(self, key: str, value: Any, fresh_ms: int, stale_ms: int) -> None:
        try:
            super()._memo_write(key, value, fresh_ms, stale_ms)
        finally:
            self.near.invalidate([key])

    def _memo_forget(self, key: str) -> bool:
        try:
            return super()._memo_forget(key)
        finally:
            self.near.invalidate([key])
