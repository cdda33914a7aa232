"""What every cache mode shares: the cachelib ``BaseCache`` interface, Immutant's extras and memoize.

A mode implements a few primitives (``_get``, ``_set``, ``_swap``, the memoize ones...); this class
turns them into cachelib's methods (``get``, ``set``, ``add``, ``inc``...) and into
``put_if_absent``, ``compare_and_set``, ``swap`` and ``memoize`` with its stampede guard.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast

import msgpack
from cachelib.base import BaseCache

from ..errors import ImmutantError
from ..metrics import definitions as metrics

log = logging.getLogger("flask_immutant.caching")

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Memoized(Protocol, Generic[P, R_co]):
    """What ``memoize`` returns: the function, plus ``forget``, ``cache_key`` and ``uncached``."""

    forget: Callable[..., bool]
    cache_key: Callable[..., str]
    uncached: Callable[..., Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

MODES = ("distributed", "replicated", "invalidated", "local")

#: Attempts of ``swap`` (and of ``inc`` where it is built on swap) before giving up.
SWAP_RETRIES = 100
#: Seconds a memoize caller waits for another one computing the same key before computing itself.
MEMOIZE_LOCK_TIMEOUT = 10.0
#: First and longest pause between two looks at a key that another caller is computing.
MEMOIZE_POLL = (0.005, 0.1)


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


#: Marks "no entry", so that ``None`` can be cached (and memoized) like any other value.
MISSING: Any = _Missing()


class CacheContentionError(ImmutantError, RuntimeError):
    """``swap`` lost the race to concurrent writers ``SWAP_RETRIES`` times in a row."""


#: cachelib's timeouts: seconds or a timedelta; 0 means no expiry, None the cache's ttl.
Timeout = int | float | timedelta | None


def seconds_to_ms(seconds: float | timedelta | None) -> int:
    """cachelib and Immutant take seconds; 0 or None means no expiry."""
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    if not seconds:
        return 0
    if seconds < 0:
        raise ValueError(f"an expiry must be >= 0 seconds, not {seconds!r}")
    return max(1, round(seconds * 1000))


def args_digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A stable digest of a call's arguments (plain values; others by ``repr``)."""
    packed = msgpack.packb([list(args), sorted(kwargs.items())], use_bin_type=True, default=repr)
    return hashlib.blake2b(packed, digest_size=16).hexdigest()


class ClusterCache(BaseCache):
    """A named cache: cachelib's interface plus ``put_if_absent``, ``compare_and_set``, ``swap``
    and ``memoize``. Get one from :func:`flask_immutant.caching.cache`.

    ``ttl``: seconds an entry lives after it is written; ``idle``: seconds it lives after it was
    last read or written (sliding); both: whichever ends first. cachelib's ``timeout`` argument,
    where given, replaces ``ttl`` for that write (0: no ttl).
    """

    mode: str = "local"

    def __init__(
        self,
        name: str,
        *,
        ttl: float | None = None,
        idle: float | None = None,
        max_entries: int | None = None,
        key_prefix: str = "",
        ignore_delete_many_errors: bool = True,
    ) -> None:
        super().__init__(default_timeout=0, ignore_delete_many_errors=ignore_delete_many_errors)
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, not {max_entries!r}")
        if not isinstance(key_prefix, str):
            raise ValueError(f"key_prefix must be a string, not {key_prefix!r}")
        self.default_timeout = math.ceil(ttl) if ttl else 0  # cachelib's view of ``ttl``: whole seconds
        self.key_prefix = key_prefix
        self.name = name
        self.ttl = ttl
        self.idle = idle
        self.max_entries = max_entries
        self.ttl_ms = seconds_to_ms(ttl)
        self.idle_ms = seconds_to_ms(idle)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} mode={self.mode} ttl={self.ttl} idle={self.idle} "
            f"max_entries={self.max_entries}>"
        )

    def describe(self) -> dict[str, Any]:
        """Configuration and counters, for the status section."""
        return {
            "name": self.name, "mode": self.mode, "ttl": self.ttl, "idle": self.idle,
            "max_entries": self.max_entries, "hits": self.hits, "misses": self.misses,
        }

    def _hit(self) -> None:
        self.hits += 1
        metrics.CACHE_HITS.inc(self.name)

    def _miss(self) -> None:
        self.misses += 1
        metrics.CACHE_MISSES.inc(self.name)

    # --- primitives a mode implements ---------------------------------------------------

    def _get(self, key: str) -> Any:
        """The value of ``key`` or ``MISSING``; slides idle expiry."""
        raise NotImplementedError

    def _get_many(self, keys: list[str]) -> list[Any]:
        return [self._get(key) for key in keys]

    def _set(self, key: str, value: Any, ttl_ms: int, mode: str) -> Any:
        """``mode``: "set" -> True; "add" -> stored?; "pia" -> ``MISSING`` if stored, else the present value."""
        raise NotImplementedError

    def _delete(self, keys: list[str]) -> int:
        raise NotImplementedError

    def _has(self, key: str) -> bool:
        raise NotImplementedError

    def _clear(self) -> bool:
        raise NotImplementedError

    def _incr(self, key: str, delta: int) -> int | None:
        incremented: int = self._swap(key, lambda old: (0 if old is MISSING else old) + delta, self.ttl_ms, None)[1]
        return incremented

    def _swap(self, key: str, fn: Callable[[Any], Any], ttl_ms: int, expect: Any) -> tuple[bool, Any]:
        """Atomically: read ``key``; if ``expect`` is given and differs, stop (False, current);
        else store ``fn(current)`` (current is ``MISSING`` when absent). Retries on contention."""
        raise NotImplementedError

    def _memo_read(self, key: str) -> tuple[Any, bool]:
        """(value or MISSING, still fresh?) of a memoized result."""
        raise NotImplementedError

    def _memo_lock(self, key: str, token: str, ttl_ms: int) -> bool | None:
        """Take the computation lock of ``key``; None when the store cannot be asked."""
        raise NotImplementedError

    def _memo_unlock(self, key: str, token: str) -> None:
        raise NotImplementedError

    def _memo_write(self, key: str, value: Any, fresh_ms: int, stale_ms: int) -> None:
        raise NotImplementedError

    def _memo_forget(self, key: str) -> bool:
        raise NotImplementedError

    def _memo_key(self, function: str, digest: str) -> str:
        return f"m:{function}:{digest}"

    # --- cachelib's interface -------------------------------------------------------------

    def _key(self, key: Any) -> str:
        """cachelib's keys: ``key_prefix`` + the key as text (a function is keyed by its ``str``, as
        cachelib's Redis backends do)."""
        return f"{self.key_prefix}{key}"

    def _ttl(self, timeout: Timeout) -> int:
        return self.ttl_ms if timeout is None else seconds_to_ms(timeout)

    def get(self, key: str) -> Any:
        value = self._get(self._key(key))
        if value is MISSING:
            self._miss()
            return None
        self._hit()
        return value

    def get_many(self, *keys: str) -> list[Any]:
        values = self._get_many([self._key(key) for key in keys])
        return [None if value is MISSING else value for value in values]

    def set(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        return bool(self._set(self._key(key), value, self._ttl(timeout), "set"))

    def add(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        return bool(self._set(self._key(key), value, self._ttl(timeout), "add"))

    def set_many(self, mapping: dict[str, Any], timeout: Timeout = None) -> list[Any]:
        return [key for key, value in mapping.items() if self.set(key, value, timeout)]

    def delete(self, key: str) -> bool:
        return self._delete([self._key(key)]) > 0

    def delete_many(self, *keys: str) -> list[Any]:
        self._delete([self._key(key) for key in keys])
        return list(keys)

    def has(self, key: str) -> bool:
        return self._has(self._key(key))

    def clear(self) -> bool:
        return self._clear()

    def inc(self, key: str, delta: int = 1) -> int | None:
        return self._incr(self._key(key), delta)

    def dec(self, key: str, delta: int = 1) -> int | None:
        return self._incr(self._key(key), -delta)

    # --- Immutant's extras ----------------------------------------------------------------

    def put_if_absent(self, key: str, value: Any, timeout: Timeout = None) -> Any:
        """Store ``value`` only if ``key`` has no entry, atomically across the cluster.

        Returns the value already present, or ``None`` when ``value`` was stored.
        """
        present = self._set(self._key(key), value, self._ttl(timeout), "pia")
        return None if present is MISSING else present

    def compare_and_set(self, key: str, old: Any, new: Any, timeout: Timeout = None) -> bool:
        """Store ``new`` only if the entry equals ``old`` (``None``: only if absent); atomic."""
        expect = MISSING if old is None else old
        done, _ = self._swap(self._key(key), lambda _current: new, self._ttl(timeout), expect)
        return done

    def swap(self, key: str, fn: Callable[[Any], Any], timeout: Timeout = None) -> Any:
        """Replace the entry with ``fn(current)`` (``current`` is ``None`` when absent), atomically:
        if another writer gets in between, ``fn`` runs again on the newer value. Returns the new value.
        ``fn`` may run more than once, so it should have no side effects."""
        _, value = self._swap(self._key(key), lambda current: fn(None if current is MISSING else current),
                              self._ttl(timeout), None)
        return value

    def memoize(
        self,
        timeout: float | None = None,
        *,
        stale: float = 0.0,
        lock_timeout: float = MEMOIZE_LOCK_TIMEOUT,
        name: str | None = None,
    ) -> Callable[[Callable[P, R]], Memoized[P, R]]:
        """Decorator: cache a function's results by its arguments, computing each once in the cluster.

        A hit costs one store round trip (none in ``invalidated`` mode). On a miss, one caller in
        the whole cluster takes a lock and computes; the others wait for its result (up to
        ``lock_timeout`` seconds, then compute themselves). With ``stale`` seconds, a result past
        its ``timeout`` (default: the cache's ``ttl``) is still returned for that long to every
        caller but the one recomputing it. The wrapper has ``.forget(*args, **kwargs)`` and
        ``.cache_key(*args, **kwargs)``.
        """
        fresh_ms = seconds_to_ms(timeout) if timeout is not None else self.ttl_ms
        stale_ms = seconds_to_ms(stale)
        if stale_ms and not fresh_ms:
            raise ValueError("memoize(stale=...) needs a timeout (or a cache ttl) after which results are stale")
        lock_ms = seconds_to_ms(lock_timeout)

        def decorator(fn: Callable[P, R]) -> Memoized[P, R]:
            function = name or f"{fn.__module__}.{fn.__qualname__}"

            @functools.wraps(fn)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                key = self._memo_key(function, args_digest(args, kwargs))
                result: R = self._memoized(key, fn, args, kwargs, fresh_ms, stale_ms, lock_ms)
                return result

            def forget(*args: Any, **kwargs: Any) -> bool:
                return self._memo_forget(self._memo_key(function, args_digest(args, kwargs)))

            def cache_key(*args: Any, **kwargs: Any) -> str:
                return self._memo_key(function, args_digest(args, kwargs))

            memoized = cast(Memoized[P, R], wrapper)  # the attributes are set on the next lines
            memoized.forget = forget
            memoized.cache_key = cache_key
            memoized.uncached = fn
            return memoized

        return decorator

    def _memoized(
        self, key: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        fresh_ms: int, stale_ms: int, lock_ms: int,
    ) -> Any:
        deadline = time.monotonic() + lock_ms / 1000
        pause = MEMOIZE_POLL[0]
        token = secrets.token_hex(8)
        while True:
            value, fresh = self._memo_read(key)
            if value is not MISSING and fresh:
                self._hit()
                return value
            locked = self._memo_lock(key, token, lock_ms)
            if locked is None:  # store unavailable: compute, do not cache
                self._miss()
                return fn(*args, **kwargs)
            if locked:
                try:
                    again, fresh = self._memo_read(key)
                    if again is not MISSING and fresh:  # another caller finished in between
                        self._hit()
                        return again
                    self._miss()
                    result = fn(*args, **kwargs)
                    self._memo_write(key, result, fresh_ms, stale_ms)
                    return result
                finally:
                    self._memo_unlock(key, token)
            if value is not MISSING:  # stale, and someone else is recomputing it
                self._hit()
                return value
            if time.monotonic() >= deadline:
                log.warning("cache %s: waited %.1fs for another computation of %s; computing it here",
                            self.name, lock_ms / 1000, key)
                self._miss()
                return fn(*args, **kwargs)
            time.sleep(pause)
            pause = min(pause * 2, MEMOIZE_POLL[1])

    def get_dict(self, *keys: str) -> dict[str, Any]:
        return dict(zip(keys, self.get_many(*keys), strict=True))
