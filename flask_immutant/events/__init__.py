"""The cluster event log: joins, leaves, failovers, deploys, ctl actions, dead letters, outages.

``emit(kind, **fields)`` from anywhere (never raises, never waits); ``record(pipe, ...)`` to write
an event with the store write it records; ``read``/``follow`` to read. Kinds: :mod:`.kinds`.
See ``docs/events.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..moved import lazy_dir, lazy_or_moved

if TYPE_CHECKING:
    from .kinds import KINDS, Kind, Name
    from .log import Event, emit, flush, follow, last_id, read, record, store_answered, store_failed, who

#: Imported on first use: the modules that emit events import this package, and a command that
#: reads them (``status``) never writes one.
_LAZY = {**dict.fromkeys(("KINDS", "Kind", "Name"), ".kinds"),
         **dict.fromkeys(("Event", "emit", "flush", "follow", "last_id", "read", "record", "store_answered",
                          "store_failed", "who"), ".log")}


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, {})


def __dir__() -> list[str]:
    return lazy_dir(globals(), _LAZY)


__all__ = ["KINDS", "Event", "Kind", "Name", "emit", "flush", "follow", "last_id", "read", "record", "store_answered",
           "store_failed", "who"]
