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

    def pattern(self) -> str:
        """Glob matching every key of this cluster (for cleanup and inspection)."""
        return f"{self.prefix}*"
