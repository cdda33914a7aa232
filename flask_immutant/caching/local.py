"""``mode="local"``: a cache in this process only, with ttl, idle and LRU ``max_entries``.

Values are kept as they are, not copied: treat them as immutable (as Immutant's Clojure values
were). The exceptions are the objects Flask mutates while serving them (responses, HTTP errors and
tuples that may hold them): those are kept encoded and rebuilt on every read, so one request's
cookies never reach the next. With a ``serializer`` (cachelib's, e.g. from ``CACHE_SERIALIZER``)
every value goes through it, as in cachelib's ``SimpleCache``. Every operation holds one lock, so
the extras are atomic within the process, which is all a local cache promises. The memoize lock is
per process too.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import typed
from .base import MISSING, ClusterCache
from .typed import MUTATED_BY_FLASK, Encoded


class _Entry:
    __slots__ = ("deadline", "expires", "value")

    def __init__(self, value: Any, expires: float, deadline: float) -> None:
        self.value = value
        self.expires = expires  # monotonic time it expires, sliding with idle
        self.deadline = deadline  # monotonic time it expires whatever happens (ttl)


INF = float("inf")


def _monotonic() -> float:
    """``time.monotonic`` looked up at each call (a test may replace this module's ``time``)."""
    return time.monotonic()


class LocalCache(ClusterCache):
    mode = "local"

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._memo_locks: dict[str, tuple[str, float]] = {}
        #: cachelib's serializer slot: None keeps values as they are (see the module docstring).
        self.serializer: Any = None
        #: The clock expiry is measured on (a test may replace it).
        self.clock: Callable[[], float] = _monotonic

    def _keep(self, value: Any) -> Any:
        if self.serializer is not None:
            data = self.serializer.dumps(value)
            if not isinstance(data, bytes):
                raise TypeError(f"cache {self.name}: {type(self.serializer).__name__} could not encode a "
                                f"{type(value).__name__}")
            return Encoded(data)
        if isinstance(value, MUTATED_BY_FLASK):
            return Encoded(typed.packb(value))
        return value

    def _give(self, kept: Any) -> Any:
        if type(kept) is not Encoded:
            return kept
        if self.serializer is not None:
            return self.serializer.loads(kept.data)
        return typed.unpackb(kept.data)

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if now >= entry.expires or now >= entry.deadline:
            del self._data[key]
            return None
        if self.idle_ms:
            entry.expires = min(now + self.idle_ms / 1000, entry.deadline)
        if self.max_entries:
            self._data.move_to_end(key)
        return entry

    def _store(self, key: str, value: Any, ttl_ms: int, now: float) -> None:
        deadline = now + ttl_ms / 1000 if ttl_ms else INF
        expires = min(now + self.idle_ms / 1000, deadline) if self.idle_ms else deadline
        self._data[key] = _Entry(value, expires, deadline)
        self._data.move_to_end(key)
        if self.max_entries:
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def _get(self, key: str) -> Any:
        with self._lock:
            entry = self._live(key, self.clock())
            return MISSING if entry is None else self._give(entry.value)

    def _set(self, key: str, value: Any, ttl_ms: int, mode: str) -> Any:
        kept = self._keep(value)
        with self._lock:
            now = self.clock()
            if mode != "set":
                entry = self._live(key, now)
                if entry is not None:
                    return False if mode == "add" else self._give(entry.value)
            self._store(key, kept, ttl_ms, now)
            return MISSING if mode == "pia" else True

    def _delete(self, keys: list[str]) -> int:
        with self._lock:
            return sum(1 for key in keys if self._data.pop(key, None) is not None)

    def _has(self, key: str) -> bool:
        with self._lock:
            return self._live(key, self.clock()) is not None

    def _clear(self) -> bool:
        with self._lock:
            self._data.clear()
        return True

    def _swap(self, key: str, fn: Callable[[Any], Any], ttl_ms: int, expect: Any) -> tuple[bool, Any]:
        with self._lock:
            now = self.clock()
            entry = self._live(key, now)
            current = MISSING if entry is None else self._give(entry.value)
            if expect is not None and current != expect:
                return False, current
            new = fn(current)
            self._store(key, self._keep(new), ttl_ms, now)
            return True, new

    # --- memoize ----------------------------------------------------------------------------

    def _memo_read(self, key: str) -> tuple[Any, bool]:
        with self._lock:
            entry = self._live(key, self.clock())
            if entry is None:
                return MISSING, False
            fresh_until, value = entry.value
            return value, self.clock() < fresh_until

    def _memo_lock(self, key: str, token: str, ttl_ms: int) -> bool | None:
        with self._lock:
            now = self.clock()
            holder = self._memo_locks.get(key)
            if holder is not None and holder[1] > now:
                return False
            self._memo_locks[key] = (token, now + ttl_ms / 1000)
            return True

    def _memo_unlock(self, key: str, token: str) -> None:
        with self._lock:
            if self._memo_locks.get(key, ("", 0.0))[0] == token:
                del self._memo_locks[key]

    def _memo_write(self, key: str, value: Any, fresh_ms: int, stale_ms: int) -> None:
        with self._lock:
            now = self.clock()
            fresh_until = now + fresh_ms / 1000 if fresh_ms else INF
            self._store(key, (fresh_until, value), fresh_ms + stale_ms if fresh_ms else 0, now)

    def _memo_forget(self, key: str) -> bool:
        return self._delete([key]) > 0
