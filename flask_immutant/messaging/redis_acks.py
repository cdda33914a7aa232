"""Acknowledgements of handled messages on the Redis broker, sent in batches.

Dramatiq's worker threads acknowledge each message with a script call of their own: one round
trip, and a release and retake of the GIL that publishers and handlers share, per message. Here a
worker lists the message's broker id and whoever sends next (the consumer thread before its next
fetch, a worker whose consumer is idle or closed, the engine's reaper loop for lists nobody else
sends, e.g. after the store refused a closing consumer's) sends the queue's whole list in one
call of ``redis_acks_send.lua``, Dramatiq's own ``ack`` for each id.

A sender takes the list under the lock, so each id goes out once; when the store fails the call
the ids go back to the list for the next sender. Sending an id twice is harmless anyway: the
script acknowledges only ids still in the ack set, as Dramatiq's ``ack`` does.
"""

from __future__ import annotations

import logging
import threading
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

    def __init__(self, broker: Any) -> None:
        self._broker = broker
        self._script = lua.script(broker.client, "messaging/redis_acks_send")
        #: Guards the lists, and the consumers' flags that decide who sends (redis_broker.py).
        self.lock = threading.Lock()
        self._ids: dict[str, list[str]] = {}

    def add(self, queue_name: str, message_id: str) -> None:
        """List ``message_id``; the caller holds :attr:`lock`."""
        self._ids.setdefault(queue_name, []).append(message_id)

    def waiting(self, queue_name: str) -> bool:
        """Whether ids of ``queue_name`` are listed (a hint, read without the lock)."""
        return bool(self._ids.get(queue_name))

    def unsent(self, queue_name: str) -> set[str]:
        """The listed ids of ``queue_name``: handled, though still in the store's ack set."""
        with self.lock:
            return set(self._ids.get(queue_name, ()))

    def send(self, queue_name: str) -> int:
        """Acknowledge the listed ids of ``queue_name`` in one call; how many were listed. On a
        store error they stay listed and the error is raised."""
        with self.lock:
            ids = self._ids.pop(queue_name, None)
        if not ids:
            return 0
        broker = self._broker
        try:
            self._script(keys=[ack_set(broker, queue_name), messages_hash(broker, queue_name)], args=ids)
        except redis.RedisError:
            with self.lock:
                self._ids.setdefault(queue_name, [])[:0] = ids
            raise
        return len(ids)

    def send_all(self) -> None:
        """Send every queue's list, keeping what the store refuses (the reaper loop's call: lists
        of a consumer closed while the store was away have no other sender)."""
        with self.lock:
            queues = [queue for queue, ids in self._ids.items() if ids]
        for queue in queues:
            try:
                self.send(queue)
            except redis.RedisError as exc:
                log.debug("messaging: acknowledgements of %s wait for the store (%s)", queue, exc)
