"""Built-in plugin: the cluster cache (``IMMUTANT_CACHE``), its settings rows and status section."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..hookspecs import hookimpl
from ..settings import Setting, float_range, to_bool
from .formats import CACHE_NAMES

if TYPE_CHECKING:
    from flask import Flask

    from ..protocols import RuntimeView
    from ..state import ImmutantState

#: The setting that turns this feature on; off, the plugin is unregistered.
FLAG = "IMMUTANT_CACHE"
FEATURE = "caching"


def _serializer(value: Any) -> str:
    if value not in CACHE_NAMES:
        raise ValueError(" or ".join(repr(name) for name in CACHE_NAMES) + " (pickle runs code from the store: "
                         "only with a store nobody else can write)")
    return str(value)


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [
        Setting(FLAG, False, to_bool, "Turn on the cluster cache: `flask_immutant.caching.cache(name, mode=...)` "
                "(docs/caching.md).", "bool"),
        Setting("IMMUTANT_CACHE_SERIALIZER", "msgpack", _serializer, "Default serializer of cache values: msgpack, "
                "json, or pickle (explicit opt-in: it runs code from the store).", "name"),
        Setting("IMMUTANT_CACHE_TIMEOUT", 1.0, float_range(0.01, 60), "Seconds a cache call waits for the store "
                "before failing open (a miss, a dropped write).", "seconds"),
        Setting("IMMUTANT_CACHE_RETRY", 1.0, float_range(0.05, 300), "Seconds the cache's circuit breaker stays "
                "open after a store failure before one call tries again.", "seconds"),
    ]


@hookimpl(trylast=True)
def immutant_init_app(app: Flask, state: ImmutantState) -> None:
    from .caches import CACHES, CacheRegistry  # here: a CLI command never imports cachelib

    state.put(CACHES, CacheRegistry(state))


@hookimpl(trylast=True)
def immutant_runtime_stopping(runtime: RuntimeView) -> None:
    from .caches import CACHES

    registry = runtime.state.get(CACHES)
    if registry is not None:
        registry.close()


@hookimpl(trylast=True)
def immutant_status(state: ImmutantState) -> dict[str, Any]:
    if __package__ + ".caches" not in sys.modules:  # then no app made a registry: never import cachelib for nothing
        return {}
    from .caches import CACHES

    registry = state.get(CACHES)
    if registry is None:
        return {}
    return {FEATURE: {
        "serializer": registry.serializer_name,
        "breaker": registry.breaker.state,
        "caches": [each.describe() for each in registry.caches()],
    }}
