"""The cluster cache: ``cache(name, mode=...)`` returns a cachelib-compatible cache with Immutant's extras.

Turn it on with ``IMMUTANT_CACHE = True``. Modes: ``distributed`` and ``replicated`` keep one copy
in the cluster store; ``invalidated`` adds a near cache in each process kept coherent by Redis;
``local`` stays in the process. See docs/caching.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..moved import lazy_or_moved

if TYPE_CHECKING:
    from flask import Flask

    from .backend import flask_caching_backend
    from .base import MISSING, CacheContentionError, ClusterCache

#: Public names imported on first use, so that loading the plugin (every CLI command does) never
#: loads cachelib.
_LAZY = {"flask_caching_backend": ".backend", "MISSING": ".base", "CacheContentionError": ".base",
         "ClusterCache": ".base"}

#: Internals that were public before issue 12: importable here still, with a DeprecationWarning.
MOVED = {
    "MODES": "flask_immutant.caching.base.MODES",
    "CircuitBreaker": "flask_immutant.caching.breaker.CircuitBreaker",
    "Serializer": "flask_immutant.caching.serialization.Serializer",
    "registry": "flask_immutant.caching.caches.registry_for",
}


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, MOVED)


def cache(
    name: str,
    *,
    mode: str = "distributed",
    ttl: float | None = None,
    idle: float | None = None,
    max_entries: int | None = None,
    serializer: str | None = None,
    app: Flask | None = None,
) -> ClusterCache:
    """The cache called ``name`` (created on first call; later calls must pass the same options).

    ``mode``: ``"distributed"`` | ``"replicated"`` | ``"invalidated"`` | ``"local"``.
    ``ttl``: seconds an entry lives after a write; ``idle``: seconds it lives unused (sliding);
    ``max_entries``: least recently used entries are evicted past it. ``serializer``: ``"msgpack"``
    (default: ``IMMUTANT_CACHE_SERIALIZER``), ``"json"`` or ``"pickle"`` (unsafe: opt-in).
    """
    from .caches import registry_for

    return registry_for(app).cache(name, mode=mode, ttl=ttl, idle=idle, max_entries=max_entries, serializer=serializer)


__all__ = ["MISSING", "CacheContentionError", "ClusterCache", "cache", "flask_caching_backend"]
