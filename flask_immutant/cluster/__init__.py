"""Node identity and cluster membership."""

from __future__ import annotations

from .identity import NodeIdentity
from .membership import Member, Membership, live_members

__all__ = ["Member", "Membership", "NodeIdentity", "live_members"]
