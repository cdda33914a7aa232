"""What ``flask immutant queues`` and the ``queues`` section of ``status --json`` show.

Schema (documented in docs/messaging.md): a list, one entry per destination, sorted by name::

    {"name": "/queue/msg", "kind": "queue", "broker": "redis",
     "queue": "<dramatiq queue>", "depth": 0, "in_flight": 0, "delayed": 0, "dead": 0,
     "consumers": 2}
    {"name": "/topic/news", "kind": "topic", "broker": "redis", "consumers": 3,
     "subscriptions": [{"queue": "...", "durable_name": "audit" | null, "owner": "<consumer>" | null,
                        "depth": 0, "in_flight": 0, "delayed": 0, "dead": 0}]}
"""

from __future__ import annotations

import json
from typing import Any

from ..keys import Keys
from .backends import Backend


def live_consumers(store: Any, keys: Keys) -> dict[str, dict[str, Any]]:
    """Consumer id -> heartbeat record, for the consumers whose heartbeat is live."""
    ids = sorted(_text(i) for i in store.smembers(keys.messaging_consumers))
    if not ids:
        return {}
    records = store.mget([keys.messaging_consumer(i) for i in ids])
    live = {}
    for consumer_id, raw in zip(ids, records, strict=True):
        if raw is not None:
            try:
                live[consumer_id] = json.loads(raw)
            except ValueError:
                continue
    return live


def queue_entries(backend: Backend, store: Any, keys: Keys) -> list[dict[str, Any]]:
    destinations = {_text(k): json.loads(v) for k, v in store.hgetall(keys.messaging_destinations).items()}
    consumers = live_consumers(store, keys)
    entries = []
    for name in sorted(destinations):
        record = destinations[name]
        if record.get("kind") == "queue":
            queue = record["queue"]
            entry: dict[str, Any] = {"name": name, "kind": "queue", "broker": backend.kind, "queue": queue}
            entry.update(_queue_numbers(backend, store, keys, queue, consumers))
            entry["consumers"] = sum(1 for c in consumers.values() if queue in c.get("queues", ()))
        else:
            subscriptions = []
            for queue, raw in sorted(store.hgetall(keys.messaging_subscriptions(name)).items()):
                sub = json.loads(raw)
                item = {"queue": _text(queue), "durable_name": sub.get("durable"), "owner": sub.get("owner")}
                item.update(_queue_numbers(backend, store, keys, _text(queue), consumers))
                subscriptions.append(item)
            entry = {"name": name, "kind": "topic", "broker": backend.kind, "subscriptions": subscriptions,
                     "consumers": sum(1 for c in consumers.values()
                                      if any(s["queue"] in c.get("queues", ()) for s in subscriptions))}
        entries.append(entry)
    return entries


def _queue_numbers(backend: Backend, store: Any, keys: Keys, queue: str,
                   consumers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    numbers: dict[str, Any] = dict(backend.queue_stats(None, queue))
    if numbers.get("in_flight") is None and backend.kind == "rabbitmq":
        numbers["in_flight"] = sum(int(c.get("prefetched", {}).get(queue, 0)) for c in consumers.values())
    rejected = numbers.pop("rejected", 0)  # in the broker's own dead-letter queue: dead as well
    numbers["dead"] = int(store.hlen(keys.messaging_dead(queue))) + int(rejected or 0)
    return numbers


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
