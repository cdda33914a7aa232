"""The cluster cache: ``cache(name, mode=...)`` returns a cachelib-compatible cache with Immutant's extras.

Turn it on with ``IMMUTANT_CACHE = True``. Modes: ``distributed`` and ``replicated`` keep one copy
in the cluster store; ``invalidated`` adds a near cache in each process kept coherent by Redis;
``local`` stays in the process. See docs/caching.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import NoAppError
from .breaker import CircuitBreaker
from .serialization import Serializer

if TYPE_CHECKING:
    from flask import Flask

    from .backend import flask_caching_backend
    from .base import MISSING, MODES, CacheContentionError, ClusterCache
    from .caches import CacheRegistry

#: Imported on first use, so that loading the plugin (every CLI command does) never loads cachelib.
_LAZY = {"flask_caching_backend": ".backend", "MISSING": ".base", "MODES": ".base",
         "CacheContentionError": ".base", "ClusterCache": ".base"}


def __getattr__(name: str) -> Any:
    """Import a name of ``_LAZY`` on first use (PEP 562) and keep it."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def registry(app: Flask | None = None) -> CacheRegistry:
    """The cache registry of ``app`` (default: the current app)."""
    from ..extension import app_for, get_state, switched_off

    target = app_for(app)
    if target is None:
        raise NoAppError("caching.cache() needs an app: pass app=..., or call it inside an app context")
    found = get_state(target).features.get("caching")
    if found is None:
        raise switched_off("cache")
    return found  # type: ignore[no-any-return]


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
    return registry(app).cache(name, mode=mode, ttl=ttl, idle=idle, max_entries=max_entries, serializer=serializer)


__all__ = [
    "MISSING",
    "MODES",
    "CacheContentionError",
    "CircuitBreaker",
    "ClusterCache",
    "Serializer",
    "cache",
    "flask_caching_backend",
    "registry",
]
