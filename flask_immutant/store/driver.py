"""What our store clients tell the server about themselves (``CLIENT SETINFO``), given up front.

redis-py 8 names itself and its version to the server on every new connection, and by default
finds the version by asking :mod:`importlib.metadata`, which scans every installed distribution:
about 1 ms per connection (half of ``flask immutant status``'s own work went to two of them). The
version redis-py carries (``redis.__version__``) is the same one: passed as the client's
``driver_info``, the server is told exactly what it was told before, without the scan.
"""

from __future__ import annotations

from typing import Any

import redis


def driver_options() -> dict[str, Any]:
    """Client options naming redis-py and its version (``{}`` for a redis-py without
    ``driver_info``, which keeps its own defaults)."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return {}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}
