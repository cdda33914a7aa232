"""The caches of one app, their store client and their circuit breaker."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import ImmutantConfigError, NoAppError
from ..protocols import Slot
from ..settings import identifier
from .base import MODES, ClusterCache, log
from .breaker import CircuitBreaker
from .local import LocalCache
from .near import InvalidatedCache
from .serialization import serializer as find_serializer
from .shared import SharedCache

if TYPE_CHECKING:
    import redis
    from flask import Flask

    from ..state import ImmutantState


def check_name_and_mode(name: str, mode: str) -> None:
    try:
        identifier(name)
    except ValueError as exc:
        raise ImmutantConfigError(f"cache name {name!r} is not allowed: expected {exc}") from None
    if mode not in MODES:
        raise ImmutantConfigError(f"cache {name}: mode {mode!r} is not one of {', '.join(MODES)}")


class CacheRegistry:
    """Kept in the app state's ``CACHES`` slot: one cache object per name, created on first use."""

    def __init__(self, state: ImmutantState) -> None:
        self.state = state
        settings = state.settings
        self.serializer_name: str = settings["IMMUTANT_CACHE_SERIALIZER"]
        self.timeout: float = settings["IMMUTANT_CACHE_TIMEOUT"]
        self.breaker = CircuitBreaker("cache", log, reset_after=settings["IMMUTANT_CACHE_RETRY"])
        self._caches: dict[str, tuple[tuple[Any, ...], ClusterCache]] = {}
        self._unnamed: list[ClusterCache] = []
        self._lock = threading.RLock()
        self._client: redis.Redis | None = None

    def client(self) -> redis.Redis:
        """A client of its own with short timeouts and no retries: a cache must fail fast."""
        with self._lock:
            return self._client_locked()

    def _client_locked(self) -> redis.Redis:
        if self._client is None:
            from ..store import client_from_url, store_url

            self._client = client_from_url(
                store_url(self.state.settings, start=True),
                socket_timeout=self.timeout, socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0),
            )
        return self._client

    def cache(
        self,
        name: str,
        *,
        mode: str = "distributed",
        ttl: float | None = None,
        idle: float | None = None,
        max_entries: int | None = None,
        serializer: str | None = None,
    ) -> ClusterCache:
        check_name_and_mode(name, mode)
        options = (mode, ttl, idle, max_entries, serializer or self.serializer_name)
        with self._lock:
            known = self._caches.get(name)
            if known is not None:
                if known[0] != options:
                    raise ImmutantConfigError(
                        f"cache {name} already exists with mode={known[0][0]} ttl={known[0][1]} idle={known[0][2]} "
                        f"max_entries={known[0][3]} serializer={known[0][4]}; one name, one configuration"
                    )
                return known[1]
            created = self._create(name, mode, ttl, idle, max_entries, options[4])
            self._caches[name] = (options, created)
            return created

    def instance(self, name: str, *, mode: str, **options: Any) -> ClusterCache:
        """A cache object of its own on the entries of ``name`` (cachelib's model: each instance has
        its own ``default_timeout``, ``key_prefix`` and ``serializer``); closed with the registry."""
        check_name_and_mode(name, mode)
        created = self._create(name, mode, serializer=self.serializer_name, **options)
        with self._lock:
            self._unnamed.append(created)
        return created

    def _create(self, name: str, mode: str, ttl: float | None = None, idle: float | None = None,
                max_entries: int | None = None, serializer: str = "msgpack", **cachelib: Any) -> ClusterCache:
        common: dict[str, Any] = {"ttl": ttl, "idle": idle, "max_entries": max_entries, **cachelib}
        if mode == "local":
            return LocalCache(name, **common)
        try:
            chosen = find_serializer(serializer, allow_pickle=True)
        except ValueError as exc:
            raise ImmutantConfigError(f"cache {name}: {exc}") from None
        kind = InvalidatedCache if mode == "invalidated" else SharedCache
        created = kind(name, client=self.client, keys=self.state.keys, serializer=chosen, breaker=self.breaker,
                       **common)
        created.mode = mode
        return created

    def caches(self) -> list[ClusterCache]:
        with self._lock:
            return [entry[1] for entry in self._caches.values()] + self._unnamed

    def close(self) -> None:
        for each in self.caches():
            close = getattr(each, "close", None)
            if close is not None:
                close()
        if self._client is not None:
            self._client.close()
            self._client = None



#: Where an app's :class:`CacheRegistry` is kept in its state (made by the plugin's ``init_app``).
CACHES: Slot[CacheRegistry] = Slot("caching")


def registry_for(app: Flask | None = None) -> CacheRegistry:
    """The cache registry of ``app`` (default: the current app); internal: users call ``cache()``."""
    from ..state import app_for, get_state, switched_off

    target = app_for(app)
    if target is None:
        raise NoAppError("caching.cache() needs an app: pass app=..., or call it inside an app context")
    found = get_state(target).get(CACHES)
    if found is None:
        raise switched_off("cache")
    return found
