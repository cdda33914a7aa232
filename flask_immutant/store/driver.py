"""What our store clients tell the server about themselves (``CLIENT SETINFO``), given up front.

redis-py 8 names itself and its version to the server on every new connection, and by default
finds the version by asking :mod:`importlib.metadata`, which scans every installed distribution:
about 1 ms per connection (half of ``flask immutant status``'s own work went to two of them). The
version redis-py carries (``redis.__version__``) is the same one: passed as the client's
``driver_info``, the server is told exactly what it was told before, without the scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

#: Options by which a caller names the client itself; then redis-py's own defaults stay.
NAMING = ("driver_info", "lib_name", "lib_version")


def driver_options(url: str = "", options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Client options naming redis-py and its version: ``{}`` when the caller's ``options`` or the
    ``url``'s query name the client themselves (redis-py would ignore them beside ``driver_info``),
    or for a redis-py without ``driver_info``."""
    if any(key in (options or {}) for key in NAMING) or any(key in parse_qs(urlsplit(url).query) for key in NAMING):
        return {}
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return {}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}
