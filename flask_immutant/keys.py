"""Every Redis key and channel name of a cluster, in one place.

All live under ``immutant:{IMMUTANT_CLUSTER}:`` so several clusters (and other data) can share a
Redis. Feature modules add their names here rather than formatting keys themselves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names of one cluster."""

    cluster: str

    @property
    def prefix(self) -> str:
        return f"immutant:{self.cluster}:"

    @property
    def members(self) -> str:
        """HASH node name -> JSON member record (address, ports, pid, up-since...)."""
        return f"{self.prefix}members"

    def member_claim(self, name: str) -> str:
        """STRING owner token with a TTL of the failure timeout: the node's heartbeat and name claim."""
        return f"{self.prefix}member:{name}"

    @property
    def events(self) -> str:
        """Pub/sub channel of membership events (JSON ``{"event", "name", "reason"}``)."""
        return f"{self.prefix}events"

    def lease(self, name: str) -> str:
        """STRING JSON ``{owner, fence, node, pid, since}`` with a TTL: who holds lease ``name``."""
        return f"{self.prefix}lease:{name}"

    def lease_fence(self, name: str) -> str:
        """STRING: the last fencing token handed out for lease ``name`` (never expires)."""
        return f"{self.prefix}lease:{name}:fence"

    @property
    def lease_released(self) -> str:
        """Pub/sub channel: the name of each lease released, to wake its contenders."""
        return f"{self.prefix}lease-released"

    @property
    def daemons(self) -> str:
        """HASH ``name`` or ``name@node`` -> JSON daemon record (state, restarts, last error)."""
        return f"{self.prefix}daemons"

    def pattern(self) -> str:
        """Glob matching every key of this cluster (for cleanup and inspection)."""
        return f"{self.prefix}*"

    def session(self, app: str, sid: str) -> str:
        """HASH session key -> serialized value: one HTTP session of app ``app`` (TTL: its lifetime)."""
        return f"{self.prefix}session:{app}:{sid}"

    def cache_prefix(self, name: str) -> str:
        """Prefix of every key of cache ``name`` (also the prefix its near caches track)."""
        return f"{self.prefix}cache:{name}:"

    def cache_entry(self, name: str, key: str) -> str:
        """STRING: one entry of cache ``name`` (1-byte header + serialized value, or an integer)."""
        return f"{self.prefix}cache:{name}:k:{key}"

    def cache_index(self, name: str) -> str:
        """ZSET entry key -> last use (ms): LRU order of cache ``name`` when it has ``max_entries``."""
        return f"{self.prefix}cache:{name}:lru"

    def cache_memo(self, name: str, function: str, digest: str) -> str:
        """STRING: one memoized result in cache ``name`` (header with fresh-until + value)."""
        return f"{self.prefix}cache:{name}:m:{function}:{digest}"

    def cache_lock(self, memo_key: str) -> str:
        """STRING owner token with a TTL: who computes ``memo_key`` now (the stampede guard)."""
        return f"{memo_key}:lock"
