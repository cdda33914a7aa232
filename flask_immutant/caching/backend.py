"""Flask-Caching's ``CACHE_*`` settings for the cluster cache: each honoured or refused by name.

``CACHE_TYPE = "flask_immutant.caching.flask_caching_backend"`` makes Flask-Caching call
:func:`flask_caching_backend` with its config; like cachelib's backends, each ``Cache`` gets a
cache object of its own (its own default timeout, key prefix and serializer) on the entries of
the cache named ``CACHE_IMMUTANT_NAME``. ``CACHE_SERIALIZER`` is applied by Flask-Caching itself
to the ``serializer`` attribute every mode has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ImmutantConfigError
from .base import MODES, ClusterCache

if TYPE_CHECKING:
    from flask import Flask

#: ``CACHE_OPTIONS`` keys the cluster cache takes (besides Flask-Caching's own two).
OPTIONS = ("default_timeout", "ignore_delete_many_errors", "key_prefix", "threshold", "idle")
#: Settings of other backends' servers: the cluster cache always uses the cluster store.
OTHER_SERVERS = ("CACHE_REDIS_", "CACHE_MEMCACHED_", "CACHE_DIR", "CACHE_UWSGI_NAME", "CACHE_GCS_BUCKET")


def flask_caching_backend(app: Flask, config: dict[str, Any], args: list[Any], options: dict[str, Any]) -> ClusterCache:
    """A Flask-Caching backend: ``CACHE_TYPE = "flask_immutant.caching.flask_caching_backend"``.

    ``CACHE_IMMUTANT_NAME`` (default ``flask-caching``) names the cache, ``CACHE_IMMUTANT_MODE``
    (default ``distributed``) its mode; ``CACHE_DEFAULT_TIMEOUT`` is its ttl, ``CACHE_KEY_PREFIX``
    its key prefix, ``CACHE_THRESHOLD`` its ``max_entries`` in local mode (0: unbounded), ``CACHE_IGNORE_ERRORS``
    and ``CACHE_OPTIONS`` as in cachelib. Settings it cannot honour are refused by name.
    """
    from .caches import registry_for

    if args:
        raise ImmutantConfigError(f"CACHE_ARGS={args!r}: the cluster cache takes no positional arguments "
                                  "(use CACHE_OPTIONS with one of: " + ", ".join(OPTIONS) + ")")
    for key, value in config.items():
        if value is not None and key.startswith(OTHER_SERVERS):
            raise ImmutantConfigError(f"{key}={value!r} is not used by the cluster cache: it keeps its entries "
                                      "in the cluster store (IMMUTANT_REDIS_URL); remove the setting")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ImmutantConfigError(f"CACHE_OPTIONS[{unknown[0]!r}]={options[unknown[0]]!r} is not an option of the "
                                  "cluster cache: choose from " + ", ".join(OPTIONS))
    name = config.get("CACHE_IMMUTANT_NAME", "flask-caching")
    mode = config.get("CACHE_IMMUTANT_MODE", "distributed")
    if mode not in MODES:
        raise ImmutantConfigError(f"CACHE_IMMUTANT_MODE={mode!r} is not one of {', '.join(MODES)}")
    key_prefix = options.get("key_prefix", config.get("CACHE_KEY_PREFIX") or "")
    if not isinstance(key_prefix, str):
        raise ImmutantConfigError(f"CACHE_KEY_PREFIX={key_prefix!r}: the cluster cache takes a string prefix")
    # As with cachelib, CACHE_THRESHOLD bounds the in-process (local) cache only: a store-backed cache
    # is bounded by the store, and Flask-Caching's default of 500 would silently evict there.
    threshold = options.get("threshold", config.get("CACHE_THRESHOLD"))
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0):
        raise ImmutantConfigError(f"CACHE_THRESHOLD={threshold!r}: expected a whole number >= 0 (0: unbounded)")
    if mode != "local" and "threshold" not in options:
        threshold = None
    timeout = options.get("default_timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout < 0):
        raise ImmutantConfigError(f"CACHE_DEFAULT_TIMEOUT={timeout!r}: expected seconds >= 0 (0: no expiry)")
    return registry_for(app).instance(
        name, mode=mode, ttl=timeout or None, idle=options.get("idle"), max_entries=threshold or None,
        key_prefix=key_prefix, ignore_delete_many_errors=bool(options.get("ignore_delete_many_errors", True)),
    )
