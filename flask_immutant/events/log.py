"""The cluster event log: a capped Redis stream every process appends to and anyone reads.

Two ways in, both never raising into the caller:

- :func:`emit` queues the event for this process's writer thread (:class:`EventLog`), so a
  failover path never waits on the store. While the store is down the queue keeps the newest
  :data:`QUEUE_LIMIT` events and the outage is logged once; they are written when it is back.
- :func:`record` adds the event to a pipeline the caller is about to execute, so the event is
  written with the fact it records (a deployment's node state, a ``ctl`` action, a dead letter).

Each entry's stream id is the store's clock (ms), so events from nodes whose clocks differ sort
right; ``at`` is the emitter's own clock (when it happened, for an event written after an outage).
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .. import lua
from ..keys import Keys
from ..loops import Loop
from ..records import decoded, from_json, shown, warn
from ..store.outage import STORE_ERRORS
from .kinds import KINDS, Name

log = logging.getLogger("flask_immutant.events")

#: Events kept in memory per process while the store cannot take them (oldest dropped first).
QUEUE_LIMIT = 1000
#: Events written per round trip.
BATCH = 100
#: Characters kept of each text field (a dead letter's reason may quote a whole message body):
#: the stream stays near ``MAXLEN`` small events, and the console's fetches stay small.
FIELD_LIMIT = 2048
#: What ends a field that was cut, followed by how many characters were left out.
CUT_MARK = "... [cut: "


def capped(text: str) -> str:
    """``text``, or its first :data:`FIELD_LIMIT` characters and a marker saying how many were cut."""
    if len(text) <= FIELD_LIMIT:
        return text
    return f"{text[:FIELD_LIMIT]}{CUT_MARK}{len(text) - FIELD_LIMIT} more characters]"


def _envelope(kind: str, node: str, fields: dict[str, Any]) -> dict[str, str]:
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    fields = {name: capped(value) if isinstance(value, str) else value for name, value in fields.items()}
    return {"kind": kind, "node": capped(node), "pid": str(os.getpid()), "at": f"{time.time():.3f}",
            "fields": json.dumps(fields, sort_keys=True, default=lambda value: capped(str(value)))}


def _xadd(client: Any, keys: Keys, entry: dict[str, str], maxlen: int | None) -> None:
    """Queue one append on ``client`` (a pipeline); an unset ``maxlen`` leaves trimming to the next
    write of a node's writer. Through a script that cannot fail the pipeline (``log_append.lua``)."""
    args: list[Any] = [maxlen or 0]
    for field, value in entry.items():
        args += [field, value]
    lua.script(client, "events/log_append")(keys=[keys.event_log], args=args, client=client)


def who() -> str:
    """``user@host`` of this process: the ``by`` of an operator's action."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return f"{user}@{socket.gethostname()}"


def record(pipe: Any, keys: Keys, kind: Name, *, node: str | None = None, **fields: Any) -> None:
    """Add event ``kind`` to ``pipe`` (a pipeline the caller executes): written with the fact it
    records, or not at all. ``node``: the emitter (default: this process's node, if any)."""
    try:
        writer = _writer
        who = node if node is not None else (writer.node if writer else os.environ.get("IMMUTANT_NODE_NAME", ""))
        _xadd(pipe, keys, _envelope(kind, who, fields), writer.maxlen if writer else None)
    except Exception:  # never break the caller's write for its event
        log.exception("could not add a %s event", kind)


class EventLog:
    """This process's writer: a bounded queue drained by a background loop."""

    def __init__(self, store: redis.Redis, keys: Keys, node: str, maxlen: int) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.maxlen = maxlen
        self._queue: collections.deque[dict[str, str]] = collections.deque(maxlen=QUEUE_LIMIT)
        self._lock = threading.Lock()  # guards the queue
        self._writing = threading.Lock()  # one writer at a time: the loop or a flush, never both
        self._down_since: float | None = None
        self._dropped = 0
        self.loop = Loop("event-log", self._step, 1.0)

    def add(self, kind: str, fields: dict[str, Any]) -> None:
        entry = _envelope(kind, self.node, fields)
        with self._lock:
            if len(self._queue) == self._queue.maxlen:
                self._dropped += 1
            self._queue.append(entry)
        self.loop.wake()

    def flush(self, timeout: float = 2.0) -> bool:
        """Write what is queued now, from the calling thread; True if nothing is left."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            if not self._write():
                return False
        return not self._queue

    def _step(self) -> float:
        while self._queue and not self.loop.stopping.is_set():
            if not self._write():
                return 5.0  # the store is down: try again later, quietly
        return 1.0

    def _write(self) -> bool:
        with self._writing:
            return self._write_batch()

    def _write_batch(self) -> bool:
        with self._lock:
            batch = [self._queue[i] for i in range(min(BATCH, len(self._queue)))]
        try:
            pipe = self.store.pipeline(transaction=False)
            for entry in batch:
                _xadd(pipe, self.keys, entry, self.maxlen)
            written = pipe.execute()
        except STORE_ERRORS as exc:
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("event log: the store cannot take events (%s); keeping the newest %d until it can",
                            exc, QUEUE_LIMIT)
            return False
        with self._lock:
            for _ in batch:
                if self._queue:
                    self._queue.popleft()
            dropped, self._dropped = self._dropped, 0
        if self._down_since is not None:
            log.warning("event log: writing events again (%d dropped meanwhile)", dropped)
            self._down_since = None
        lost = sum(1 for w in written if not w)
        if lost:
            warn(f"event log: {self.keys.event_log} is not a stream; {lost} event(s) dropped")
        return True


_writer: EventLog | None = None
_early: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(maxlen=QUEUE_LIMIT)
_start_lock = threading.Lock()


def start(store: redis.Redis, keys: Keys, node: str, maxlen: int) -> EventLog:
    """Start this process's writer (the first call wins) and hand it what was emitted before."""
    global _writer
    with _start_lock:
        if _writer is not None:
            return _writer
        writer = EventLog(store, keys, node, maxlen)
        while _early:
            writer.add(*_early.popleft())
        _writer = writer
    writer.loop.start()
    atexit.register(writer.flush, 2.0)
    return writer


def stop(timeout: float = 2.0) -> None:
    """Write what is queued (bounded by ``timeout``) and stop the writer."""
    global _writer
    with _start_lock:
        writer, _writer = _writer, None
    if writer is not None:
        writer.loop.stop(timeout)
        writer.flush(timeout)


def flush(timeout: float = 2.0) -> bool:
    """Write this process's queued events now (a process about to exit); True if all were written."""
    writer = _writer
    try:
        return writer.flush(timeout) if writer is not None else True
    except Exception:
        log.exception("could not flush the event log")
        return False


def emit(kind: Name, **fields: Any) -> None:
    """Queue event ``kind`` for this process's writer; never raises, never waits on the store.
    Before the writer starts, the newest :data:`QUEUE_LIMIT` events wait for it."""
    try:
        writer = _writer
        if writer is None:
            if kind not in KINDS:
                raise ValueError(f"unknown event kind {kind!r}")
            _early.append((kind, fields))
        else:
            writer.add(kind, fields)
    except Exception:
        log.exception("could not emit a %s event", kind)


# --- outages, as a node supervisor sees them ----------------------------------------------------

_outage: dict[str, Any] = {}


def store_failed(exc: BaseException) -> None:
    """The node's heartbeat could not reach the store: remember since when (once per outage)."""
    if not _outage:
        _outage.update(since=time.time(), error=f"{type(exc).__name__}: {exc}")


def store_answered() -> None:
    """The heartbeat reached the store: if it had not before, the outage is over — one event."""
    if _outage:
        since, error = _outage["since"], _outage["error"]
        _outage.clear()
        until = time.time()
        emit("store.outage", since=round(since, 3), until=round(until, 3), seconds=round(until - since, 3),
             error=error)


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One entry of the log, as read."""

    id: str
    time: float  # the store's clock when it was written (from the id)
    kind: str
    node: str
    pid: int | None
    at: float | None  # the emitter's clock when it happened
    fields: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "kind": self.kind, "node": self.node, "pid": self.pid,
                "at": self.at, "fields": self.fields}


def parse(raw_id: Any, raw: Any) -> Event:
    """One stream entry; raises a :data:`~flask_immutant.records.MALFORMED` error if it is not one
    the writers write."""
    entry_id = decoded(raw_id)
    if entry_id is None or "-" not in entry_id:
        raise ValueError("its id is not text")
    data = {decoded(k): decoded(v) for k, v in raw.items()}
    kind, fields = data.get("kind"), data.get("fields")
    if not kind or fields is None:
        raise KeyError("missing kind or fields")
    parsed = from_json(fields)
    if not isinstance(parsed, dict):
        raise TypeError(f"fields is a JSON {type(parsed).__name__}, not an object")
    pid, at = data.get("pid"), data.get("at")
    return Event(entry_id, int(entry_id.split("-")[0]) / 1000.0, kind, data.get("node") or "",
                 int(pid) if pid and pid.isdigit() else None, float(at) if at else None, parsed)


def _parsed(entries: Any) -> Iterator[Event]:
    from ..records import MALFORMED

    for raw_id, raw in entries or ():
        try:
            yield parse(raw_id, raw)
        except MALFORMED as exc:
            warn(f"skipped the event {shown(raw_id)}: {type(exc).__name__}: {exc}")


def read(store: redis.Redis, keys: Keys, since: float | None = None, count: int | None = None,
         until: str = "+") -> list[Event]:
    """The events written since ``since`` (epoch seconds, store clock; ``None``: all kept) up to id
    ``until``, oldest first; ``count``: only the newest that many. Malformed entries are skipped
    with a warning naming them."""
    start = f"{int(since * 1000)}-0" if since is not None else "-"
    entries: Any
    try:
        if count is not None:
            entries = list(reversed(store.xrevrange(keys.event_log, until, start, count=count) or []))
        else:
            entries = store.xrange(keys.event_log, start, until)
    except redis.ResponseError as exc:
        warn(f"skipped every event: {keys.event_log} is not a stream ({exc})")
        return []
    return list(_parsed(entries))


def last_id(store: redis.Redis, keys: Keys) -> str:
    """The id of the newest event (``0-0`` when there is none yet): where a follower starts."""
    from ..errors import ImmutantError

    try:
        newest: Any = store.xrevrange(keys.event_log, "+", "-", count=1)
    except redis.ResponseError as exc:
        raise ImmutantError(f"{keys.event_log} is not a stream ({exc})") from None
    return (decoded(newest[0][0]) or "0-0") if newest else "0-0"


def follow(store: redis.Redis, keys: Keys, after: str, block_ms: int = 1000) -> tuple[list[Event], str]:
    """Events written after id ``after``, waiting up to ``block_ms`` for one; and the id to pass next."""
    answer: Any = store.xread({keys.event_log: after}, block=block_ms, count=BATCH)
    entries = answer[0][1] if answer else []
    last = decoded(entries[-1][0]) if entries else None
    return list(_parsed(entries)), last or after
