"""The one rule for "the store cannot serve right now": an outage, handled like a lost connection.

A store that is failing over, loading its data, busy with a slow script, lacking the replicas
``min-replicas-to-write`` asks for, or demoted to a replica answers with an error reply instead
of dropping the connection. Sessions (503), caches (fail open), leases (stop work), messaging and
membership (retry) treat those replies exactly like a refused connection; anything else is a bug.
A non-redis exception raised inside redis-py (:func:`is_client_fault`) is neither: sessions and
caches answer it as they answer an outage, without opening their circuit breaker.
"""

from __future__ import annotations

import re
import time

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


def is_client_fault(exc: BaseException) -> bool:
    """True if ``exc`` is no redis-py error yet was raised inside redis-py: the client failed on
    its side (seen: a connection torn down by another thread under the one reading on it, whose
    parser then reads from a closed or missing buffer). The store may be fine and the call's
    outcome is unknown: not an outage, and not a bug of the caller either."""
    if not isinstance(exc, Exception) or isinstance(exc, STORE_ERRORS):
        return False
    tb, innermost = exc.__traceback__, None
    while tb is not None:
        innermost, tb = tb, tb.tb_next
    module = "" if innermost is None else str(innermost.tb_frame.f_globals.get("__name__", ""))
    return module == "redis" or module.startswith("redis.")


def is_outage(exc: BaseException) -> bool:
    """True if ``exc`` means the store is (for now) unable to serve, not that the call was wrong."""
    if isinstance(exc, OUTAGE_CLASSES):
        return True
    return isinstance(exc, redis.ResponseError) and bool(_REPLY.search(str(exc)))


class Recovery:
    """Whether heartbeats read from the store can be trusted to tell the dead from the living.

    After this process could not reach the store for a while (an outage, a failover, its own
    stall), every heartbeat may have expired meanwhile, live ones included. Liveness is judged
    again only once the store has answered for a whole failure timeout, so every live process has
    written a fresh heartbeat by then. Call :meth:`answered` after each successful store call.
    """

    def __init__(self, failure_timeout: float) -> None:
        self.window = failure_timeout
        self._last_answer = time.monotonic()
        self._trusted_from = 0.0

    def answered(self) -> None:
        now = time.monotonic()
        if now - self._last_answer > self.window / 2:
            self._trusted_from = now + self.window
        self._last_answer = now

    def trusted(self) -> bool:
        return time.monotonic() >= self._trusted_from
