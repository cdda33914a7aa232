"""Acknowledgements of handled messages on the Redis broker, sent in batches.

Dramatiq's worker threads acknowledge each message with a script call of their own: one round
trip, and a release and retake of the GIL that publishers and handlers share, per message. Here a
worker lists the message's broker id and whoever sends next (the consumer thread before its next
fetch, a worker whose consumer is idle or closed, the engine's reaper loop for lists that nobody
sent for a whole interval) sends the queue's whole list in one call of ``redis_acks_send.lua``,
Dramatiq's own ``ack`` for each id.

A sender takes the list under the lock, so each id goes out once; until the call returns the ids
count as in flight, and when it fails they go back to the list for the next sender. Sending an id
twice is harmless anyway: the script acknowledges only ids still in the ack set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from .. import lua

log = logging.getLogger("flask_immutant.messaging")


def ack_set(broker: Any, queue_name: str) -> str:
    """Dramatiq's set of the ids this broker fetched from ``queue_name`` and has not acknowledged
    (dispatch.lua's ``queue_acks``; backends_reap.lua reads it too)."""
    return f"{broker.namespace}:__acks__.{broker.broker_id}.{queue_name}"


def messages_hash(broker: Any, queue_name: str) -> str:
    """Dramatiq's hash of ``queue_name``'s messages by id (dispatch.lua's ``queue_messages``)."""
    return f"{broker.namespace}:{queue_name}.msgs"


class PendingAcks:
    """One broker's handled messages not yet acknowledged in the store, by queue."""

    def __init__(self, broker: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._broker = broker
        self._script = lua.script(broker.client, "messaging/redis_acks_send")
        self._clock = clock
        self._lock = threading.Lock()
        self._listed: dict[str, list[str]] = {}
        #: queue -> when its list was last empty (the age send_all goes by)
        self._since: dict[str, float] = {}
        #: queue -> ids taken by a sender whose call has not returned
        self._in_flight: dict[str, Counter[str]] = {}
        #: queues whose last send failed (warned once, until one succeeds)
        self._failing: set[str] = set()

    def add(self, queue_name: str, message_id: str) -> None:
        with self._lock:
            listed = self._listed.setdefault(queue_name, [])
            if not listed:
                self._since[queue_name] = self._clock()
            listed.append(message_id)

    def listed(self, queue_name: str) -> bool:
        """Whether ids of ``queue_name`` wait to be sent (a hint, read without the lock)."""
        return bool(self._listed.get(queue_name))

    def unsent(self, queue_name: str) -> set[str]:
        """The ids of ``queue_name`` handled but maybe still in the store's ack set."""
        with self._lock:
            return set(self._listed.get(queue_name, ())) | set(self._in_flight.get(queue_name, ()))

    def send(self, queue_name: str) -> int:
        """Acknowledge the listed ids of ``queue_name`` in one call; how many were listed. On a
        store error they stay listed and the error is raised."""
        with self._lock:
            ids = self._listed.pop(queue_name, None)
            self._since.pop(queue_name, None)
            if not ids:
                return 0
            in_flight = self._in_flight.setdefault(queue_name, Counter())
            in_flight.update(ids)
        broker = self._broker
        sent = False
        try:
            self._script(keys=[ack_set(broker, queue_name), messages_hash(broker, queue_name)], args=ids)
            sent = True
        except redis.RedisError as exc:
            self._note_failure(queue_name, exc)
            raise
        finally:
            with self._lock:
                for message_id in ids:
                    in_flight[message_id] -= 1
                    if in_flight[message_id] <= 0:
                        del in_flight[message_id]
                if not in_flight:
                    self._in_flight.pop(queue_name, None)
                if not sent:  # any error, not only the store's: these messages are handled
                    listed = self._listed.setdefault(queue_name, [])
                    if not listed:
                        self._since[queue_name] = self._clock()
                    listed[:0] = ids
        if queue_name in self._failing:
            self._failing.discard(queue_name)
            log.info("messaging: acknowledgements of %s reach the store again", queue_name)
        return len(ids)

    def send_or_keep(self, queue_name: str) -> None:
        """:meth:`send`, whose ids a store error leaves listed for the next sender (warned once)."""
        try:
            self.send(queue_name)
        except redis.RedisError:
            pass

    def _note_failure(self, queue_name: str, exc: Exception) -> None:
        if queue_name not in self._failing:
            self._failing.add(queue_name)
            log.warning("messaging: acknowledgements of handled messages of %s wait for the store (%s)",
                        queue_name, exc)

    def send_all(self, older_than: float = 0.0) -> int:
        """Send each list that has waited ``older_than`` seconds or more; how many ids are left
        unsent. The reaper loop's call, for lists nobody else sends (a consumer closed while the
        store refused them): a live consumer sends its own within milliseconds."""
        now = self._clock()
        with self._lock:
            queues = [queue for queue, ids in self._listed.items()
                      if ids and now - self._since.get(queue, now) >= older_than]
        for queue in queues:
            self.send_or_keep(queue)
        with self._lock:
            return sum(len(ids) for ids in self._listed.values())
