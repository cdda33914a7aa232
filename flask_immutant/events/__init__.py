"""The cluster event log: joins, leaves, failovers, deploys, ctl actions, dead letters, outages.

``emit(kind, **fields)`` from anywhere (never raises, never waits); ``record(pipe, ...)`` to write
an event with the store write it records; ``read``/``follow`` to read. Kinds: :mod:`.kinds`.
See ``docs/events.md``.
"""

from __future__ import annotations

from .kinds import KINDS, Kind, Name
from .log import Event, emit, flush, follow, last_id, read, record, store_answered, store_failed, who

__all__ = ["KINDS", "Event", "Kind", "Name", "emit", "flush", "follow", "last_id", "read", "record", "store_answered",
           "store_failed", "who"]
