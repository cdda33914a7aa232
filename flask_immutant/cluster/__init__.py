"""Node identity and cluster membership."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..moved import lazy_dir, lazy_or_moved

if TYPE_CHECKING:
    from .identity import NodeIdentity
    from .membership import Member, Membership, live_members

#: Imported on first use: a command that reads the members never needs a node's identity.
_LAZY = {"NodeIdentity": ".identity", **dict.fromkeys(("Member", "Membership", "live_members"), ".membership")}


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, {})


def __dir__() -> list[str]:
    return lazy_dir(globals(), _LAZY)


__all__ = ["Member", "Membership", "NodeIdentity", "live_members"]
