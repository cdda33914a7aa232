"""The one rule for "the store cannot serve right now": an outage, handled like a lost connection.

A store that is failing over, loading its data, busy with a slow script, lacking the replicas
``min-replicas-to-write`` asks for, or demoted to a replica answers with an error reply instead
of dropping the connection. Sessions (503), caches (fail open), leases (stop work), messaging and
membership (retry) treat those replies exactly like a refused connection; anything else is a bug.
"""

from __future__ import annotations

import re

import redis
from redis import exceptions

from ..errors import StoreUnavailableError

#: Error replies that mean an outage. A Lua script reports them as ``...: -CODE message`` and a
#: pipeline as ``... caused error: CODE message``, so the code is matched there too.
OUTAGE_REPLIES = ("NOREPLICAS", "READONLY", "MASTERDOWN", "LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN",
                  "UNBLOCKED", "FAILOVER")
_REPLY = re.compile(r"(?:^|: -|caused error: )(?:" + "|".join(OUTAGE_REPLIES) + r")\b")

#: Exception classes that are outages whatever their text (Sentinel's MasterNotFoundError and the
#: LOADING reply's BusyLoadingError are ConnectionErrors in redis-py).
OUTAGE_CLASSES: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, StoreUnavailableError, exceptions.ReadOnlyError,
    *(getattr(exceptions, name) for name in ("MasterDownError", "TryAgainError", "ClusterDownError")
      if hasattr(exceptions, name)),
)

#: What a store call can raise: catch these, then ask :func:`is_outage`.
STORE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, StoreUnavailableError)


def is_outage(exc: BaseException) -> bool:
    """True if ``exc`` means the store is (for now) unable to serve, not that the call was wrong."""
    if isinstance(exc, OUTAGE_CLASSES):
        return True
    return isinstance(exc, redis.ResponseError) and bool(_REPLY.search(str(exc)))
