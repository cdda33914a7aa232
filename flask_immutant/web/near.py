"""The session near cache: a hot, unchanged session is read with no store round trip.

Each process keeps the stored fields of recently read sessions (their encoded bytes, so every
request decodes a copy of its own) with the moment they expire. Coherence is the ``invalidated``
cache mode's (``caching/near.py``: the same :class:`NearCache` and :class:`Tracker`): Redis reports
every change of a key under the app's session prefix on a tracking connection, and:

- a read that misses keeps its result only if no invalidation of that session arrived while it was
  in flight, and only while tracking is up (until subscribed, and after a lost connection, every
  read goes to the store);
- a near copy is used only when the tracking connection is *settled*: nothing unread on its socket
  and nothing read but not yet applied. Redis writes an invalidation before it answers the write,
  so a write that has returned on another node of the machine is always seen (docs/sessions.md,
  "Near cache", says what that means across machines).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from ..caching.base import MISSING
from ..caching.near import INF, NearCache, Tracker

#: What a read of one session returns: its fields (as Redis returned them) and its remaining ms.
Read = list[Any]


class SessionNearCache:
    """Near copies of the sessions under ``prefix``, for one app in one process."""

    def __init__(self, name: str, client: Callable[[], redis.Redis], prefix: str, max_entries: int) -> None:
        self.near = NearCache(max_entries, lru=True)
        self.tracker = Tracker(name, client, prefix, self.near, label="sessions")
        self.hits = 0
        self._started = False
        self._start_lock = threading.Lock()

    def lookup(self, store_id: str) -> tuple[dict[Any, bytes], int] | None:
        """The near copy of ``store_id`` (its fields and remaining ms), or None: read the store."""
        if not self._started:
            with self._start_lock:  # the first requests may come on several threads at once
                if not self._started:
                    self.tracker.start()
                    self._started = True
            return None
        if not self.tracker.settled():  # first: an invalidation read after the lookup would be missed
            return None
        entry = self.near.get(store_id)
        if entry is MISSING:
            return None
        fields, expires = entry
        self.hits += 1
        return fields, (-1 if expires == INF else max(0, int((expires - time.monotonic()) * 1000)))

    def fill(self, store_id: str, read: Callable[[], Read]) -> Read:
        """``read()`` the session from the store; keep its fields near unless it changed meanwhile.
        Only a stored session (a non-empty hash) is kept."""
        token = self.near.begin(store_id)
        kept: Any = MISSING
        expires = INF
        try:
            fields, remaining = result = read()
            if fields and isinstance(fields, dict):
                if isinstance(remaining, int) and remaining > 0:
                    expires = time.monotonic() + remaining / 1000
                kept = (fields, expires)
            return result
        finally:
            self.near.finish(store_id, token, kept, expires, INF)

    def forget(self, store_id: str) -> None:
        """This process wrote or deleted ``store_id``: drop its copy now (the invalidation follows)."""
        self.near.invalidate([store_id])

    def describe(self) -> dict[str, Any]:
        return {"near_hits": self.hits, "near_entries": len(self.near), "tracking": self.near.healthy}

    def close(self) -> None:
        with self._start_lock:
            if self._started:
                self.tracker.stop()
