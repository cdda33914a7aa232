"""``mode="distributed"`` (and ``"replicated"``): one copy of each entry, in the cluster store.

An entry is one Redis string under ``Keys.cache_entry``. Its bytes are a one-byte header and the
serialized value: ``\\x00`` + payload; ``\\x03`` + typed msgpack (``typed.py``; a header of its own,
so that a node of an older release, mid rolling upgrade, reads it as a miss rather than as plain
msgpack); ``\\x01`` + 13-digit absolute deadline (ms) + entry, for caches with both ttl and idle;
``\\x02`` + 13-digit fresh-until (ms) + entry, for memoized results.
Integers are stored as plain ASCII digits, so ``inc`` is Redis's own atomic ``INCRBY``.

Fail-open: when the store cannot be reached, reads miss and writes are dropped (a warning is
logged when the circuit opens and when it closes); a circuit breaker spares later calls the
timeout. The atomic extras (``put_if_absent``, ``compare_and_set``, ``swap``) raise
:class:`~flask_immutant.errors.StoreUnavailableError` instead: a caller coordinating through
them must know that nothing was coordinated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis

from .. import lua
from ..errors import StoreUnavailableError
from ..keys import Keys
from ..store import direct
from .base import MISSING, SWAP_RETRIES, CacheContentionError, ClusterCache, log
from .breaker import CircuitBreaker, StoreDown
from .serialization import Serializer
from .typed import TypedMsgpackSerializer

#: Decodes ``TYPED`` entries whatever the cache's serializer now is (the header says what they are).
TYPED_CODEC = TypedMsgpackSerializer()

T = TypeVar("T")


PLAIN, DEADLINE, MEMO, TYPED = 0, 1, 2, 3
_INT_START = frozenset(b"-0123456789")
#: Keys deleted per round trip by ``clear``.
CLEAR_BATCH = 500


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


class _Down(Exception):
    """The breaker is open or the store just failed: take the fail-open path."""


class SharedCache(ClusterCache):
    mode = "distributed"

    def __init__(
        self,
        name: str,
        *,
        client: Callable[[], redis.Redis],
        keys: Keys,
        serializer: Serializer,
        breaker: CircuitBreaker,
        **options: Any,
    ) -> None:
        super().__init__(name, **options)
        self._connect = client
        self._client: redis.Redis | None = None
        self._direct: direct.Pinned  # with the client: the connection of the plain GET/SET path
        self._connect_lock = threading.Lock()
        self.keys = keys
        self.serializer = serializer
        self.breaker = breaker
        self.prefix = keys.cache_prefix(name)
        self._entry_prefix = keys.cache_entry(name, "")
        self._index = keys.cache_index(name)
        self._indexed = "1" if self.max_entries else "0"
        # Reads that need a script: sliding expiry (which must never pass an entry's own deadline)
        # or an LRU index. Every other read is one plain GET.
        self._scripted = bool(self.idle_ms or self.max_entries)

    # --- plumbing --------------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            with self._connect_lock:
                if self._client is None:
                    client = self._connect()
                    self._scripts = {f"cache_{name}": lua.script(client, f"caching/shared_{name}")
                                     for name in ("get", "set", "incr", "unlock")}
                    self._direct = direct.Pinned(client)
                    self._client = client
        return self._client

    def _call(self, op: Callable[[], T]) -> T:
        """Run ``op`` against the store unless the breaker is open; raise _Down if it cannot."""

        def connected() -> T:
            if self._client is None:
                self.client  # noqa: B018 - connect (and start the embedded store) inside the guard
            return op()

        try:
            return self.breaker.call(connected)
        except StoreDown as down:
            if down.client_fault:  # a connection torn down under this read: fail open, say so
                log.error("cache %s: the store client failed (%s); failing open", self.name, down.reason,
                          exc_info=down.cause)
            outage = down.cause is not None and not down.client_fault
            raise _Down(str(down.cause) if outage else down.reason) from down.cause  # an outage: its own words

    def _strict(self, op: Callable[[], T]) -> T:
        """``_call`` for the atomic extras: an unreachable store is an error, not a miss."""
        try:
            return self._call(op)
        except _Down as exc:
            raise StoreUnavailableError(f"cache {self.name}: the cluster store is unavailable ({exc})") from None

    def rkey(self, key: str) -> str:
        return self._entry_prefix + key

    def encode(self, value: Any) -> bytes:
        if type(value) is int:
            return str(value).encode()
        payload = self.serializer.dumps(value)
        if not isinstance(payload, bytes):  # cachelib's serializers log and return None
            raise TypeError(f"cache {self.name}: {type(self.serializer).__name__} could not encode a "
                            f"{type(value).__name__}")
        return (b"\x03" if type(self.serializer) is TypedMsgpackSerializer else b"\x00") + payload

    def decode(self, raw: bytes | redis.ResponseError | None) -> Any:
        """The value in ``raw``; ``MISSING`` for no entry, bytes that are not a valid entry, or a
        key of another Redis type (the read's error, garbage in the store)."""
        if raw is None:
            return MISSING
        if isinstance(raw, redis.ResponseError):
            log.warning("cache %s: ignoring a key that is not a cache entry: %s", self.name, raw)
            return MISSING
        try:
            tag = raw[0]
            if tag == DEADLINE:
                raw, tag = raw[14:], raw[14]
            if tag == TYPED:
                return TYPED_CODEC.loads(raw[1:])
            if tag == PLAIN:
                return self.serializer.loads(raw[1:])
            if tag in _INT_START:
                return int(raw)
        except (ValueError, IndexError) as exc:
            log.warning("cache %s: ignoring an entry that is not valid %s: %s", self.name,
                        getattr(self.serializer, "name", type(self.serializer).__name__), exc)
            return MISSING
        log.warning("cache %s: ignoring an entry with an unknown header %r", self.name, raw[:1])
        return MISSING

    def _queue_set(self, pipe: Any, rkey: str, raw: bytes, ttl_ms: int, mode: str = "set") -> Any:
        """Queue the write on a pipeline, or run it on the client (and return its reply). A script
        only where the write is more than one SET: an LRU index, put-if-absent's answer, or the
        deadline header of an entry with both ttl and idle expiry."""
        if self.max_entries or mode == "pia" or (ttl_ms and self.idle_ms):
            return self._scripts["cache_set"](
                keys=[rkey, self._index], args=[raw, ttl_ms, self.idle_ms, self.max_entries or 0, mode], client=pipe
            )
        args: list[Any] = ["SET", rkey, raw]
        if ttl_ms or self.idle_ms:
            args += ["PX", ttl_ms or self.idle_ms]
        if mode == "add":
            args.append("NX")
        if pipe is self._client:
            return self._direct.command(*args)
        return pipe.execute_command(*args)

    def _read_raw(self, rkey: str) -> bytes | None:
        if self._scripted:
            return self._scripts["cache_get"](keys=[rkey, self._index], args=[self.idle_ms, self._indexed])  # type: ignore[no-any-return]
        return self._direct.command("GET", rkey)  # type: ignore[no-any-return]

    # --- primitives ------------------------------------------------------------------------

    def _get(self, key: str) -> Any:
        try:
            return self.decode(self._call(lambda: self._read_raw(self.rkey(key))))
        except _Down:
            return MISSING
        except redis.ResponseError as exc:
            return self.decode(exc)

    def _get_many(self, keys: list[str]) -> list[Any]:
        if not keys:
            return []
        rkeys = [self.rkey(key) for key in keys]

        def read() -> list[Any]:
            if not self._scripted:
                return self.client.mget(rkeys)
            pipe = self.client.pipeline(transaction=False)
            for rkey in rkeys:
                self._scripts["cache_get"](keys=[rkey, self._index], args=[self.idle_ms, self._indexed], client=pipe)
            return pipe.execute()

        try:
            return [self.decode(raw) for raw in self._call(read)]
        except _Down:
            return [MISSING] * len(keys)

    def _set(self, key: str, value: Any, ttl_ms: int, mode: str) -> Any:
        raw = self.encode(value)
        rkey = self.rkey(key)

        def write() -> Any:
            return self._queue_set(self.client, rkey, raw, ttl_ms, mode)  # on a client it runs at once

        if mode == "pia":
            present = self._strict(write)
            return MISSING if not present else self.decode(present)
        try:
            return bool(self._call(write))
        except _Down:
            log.debug("cache %s: store unavailable, dropped a write of %s", self.name, key)
            return False

    def _delete(self, keys: list[str]) -> int:
        if not keys:
            return 0
        rkeys = [self.rkey(key) for key in keys]

        def delete() -> int:
            if not self.max_entries:
                return self.client.delete(*rkeys)
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*rkeys)
            pipe.zrem(self._index, *rkeys)
            return cast(int, pipe.execute()[0])  # DEL's integer reply

        try:
            return self._call(delete)
        except _Down:
            return 0

    def _has(self, key: str) -> bool:
        try:
            return bool(self._call(lambda: self.client.exists(self.rkey(key))))
        except _Down:
            return False

    def _clear_pattern(self) -> str:
        """Everything of the cache; with a ``key_prefix``, only the entries under it (as cachelib's)."""
        if not self.key_prefix:
            return glob_escape(self.prefix) + "*"
        return glob_escape(self.rkey(self.key_prefix)) + "*"

    def _clear(self) -> bool:
        def clear() -> bool:
            batch: list[Any] = []
            for rkey in self.client.scan_iter(match=self._clear_pattern(), count=CLEAR_BATCH):
                batch.append(rkey)
                if len(batch) >= CLEAR_BATCH:
                    self.client.unlink(*batch)
                    batch.clear()
            if batch:
                self.client.unlink(*batch)
            return True

        try:
            return self._call(clear)
        except _Down:
            return False

    def _incr(self, key: str, delta: int) -> int | None:
        if self.ttl_ms and self.idle_ms:  # the deadline header does not fit an ASCII integer
            return super()._incr(key, delta)
        try:
            return self._call(lambda: cast(int, self._scripts["cache_incr"](  # Lua's integer reply
                keys=[self.rkey(key), self._index], args=[delta, self.ttl_ms, self.idle_ms, self._indexed])))
        except _Down:
            return None
        except redis.ResponseError as exc:
            if "not an integer" not in str(exc):
                raise
            return super()._incr(key, delta)  # a non-integer value: let swap call it a TypeError

    def _swap(self, key: str, fn: Callable[[Any], Any], ttl_ms: int, expect: Any) -> tuple[bool, Any]:
        rkey = self.rkey(key)

        def attempt() -> tuple[bool, Any] | None:
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(rkey)
                    current = self.decode(cast("bytes | None", pipe.get(rkey)))  # watching: GET answers at once
                    if expect is not None and current != expect:
                        return False, current
                    new = fn(current)
                    pipe.multi()
                    self._queue_set(pipe, rkey, self.encode(new), ttl_ms)
                    pipe.execute()
                    return True, new
                except redis.WatchError:
                    return None

        for _ in range(SWAP_RETRIES):
            outcome = self._strict(attempt)
            if outcome is not None:
                return outcome
        raise CacheContentionError(f"cache {self.name}: {key!r} changed under {SWAP_RETRIES} attempts in a row")

    # --- memoize ----------------------------------------------------------------------------

    def _memo_key(self, function: str, digest: str) -> str:
        return self.keys.cache_memo(self.name, function, digest)

    def decode_memo(self, raw: bytes | None) -> tuple[Any, bool]:
        if raw is None or raw[:1] != b"\x02":
            return MISSING, False
        fresh_until = int(raw[1:14])
        value = self.decode(raw[14:])
        return value, fresh_until == 0 or time.time() * 1000 < fresh_until

    def _memo_read(self, key: str) -> tuple[Any, bool]:
        try:
            return self.decode_memo(self._call(lambda: self._direct.command("GET", key)))
        except _Down:
            return MISSING, False

    def _memo_lock(self, key: str, token: str, ttl_ms: int) -> bool | None:
        try:
            return bool(self._call(lambda: self.client.set(self.keys.cache_lock(key), token, nx=True, px=ttl_ms)))
        except _Down:
            return None

    def _memo_unlock(self, key: str, token: str) -> None:
        try:
            self._call(lambda: self._scripts["cache_unlock"](keys=[self.keys.cache_lock(key)], args=[token]))
        except _Down:
            pass

    def _memo_write(self, key: str, value: Any, fresh_ms: int, stale_ms: int) -> None:
        fresh_until = int(time.time() * 1000) + fresh_ms if fresh_ms else 0
        raw = b"\x02" + b"%013d" % fresh_until + self.encode(value)
        try:
            self._call(lambda: self._queue_memo(key, raw, fresh_ms + stale_ms))
        except _Down:
            pass

    def _queue_memo(self, key: str, raw: bytes, px: int) -> Any:
        return self._direct.command("SET", key, raw, *(("PX", px) if px else ()))

    def _memo_forget(self, key: str) -> bool:
        try:
            return bool(self._call(lambda: self.client.delete(key)))
        except _Down:
            return False

    def close(self) -> None:
        """Forget the client (the pool belongs to the cache registry, which closes it)."""
        if self._client is not None:
            self._direct.close()
        self._client = None
