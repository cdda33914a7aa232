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

from typing import Any

from ..keys import Keys
from ..records import check_types, decoded, hash_of, json_object, read_records, required, set_of
from .backends import Backend


def live_consumers(store: Any, keys: Keys) -> dict[str, dict[str, Any]]:
    """Consumer id -> heartbeat record, for the consumers whose heartbeat is live."""
    ids = set_of(store, keys.messaging_consumers, "consumer")
    if not ids:
        return {}
    records = store.mget([keys.messaging_consumer(i) for i in ids])
    found = {i: raw for i, raw in zip(ids, records, strict=True) if raw is not None}
    return read_records(found, "consumer", _consumer)


def _consumer(name: str, raw: Any) -> dict[str, Any]:
    record = json_object(name, raw)
    check_types(record, {"queues": list, "prefetched": dict})
    return record


def _destination(name: str, raw: Any) -> dict[str, Any]:
    record = json_object(name, raw)
    if record.get("kind") not in ("queue", "topic"):
        raise ValueError(f"kind {record.get('kind')!r} is neither 'queue' nor 'topic'")
    if record["kind"] == "queue":
        required(record, {"queue": str})
    return record


def _subscription(name: str, raw: Any) -> dict[str, Any]:
    record = json_object(name, raw)
    check_types(record, {"durable": (str, type(None)), "owner": (str, type(None))})
    return record


def destination_queues(store: Any, keys: Keys) -> dict[str, list[str]]:
    """Destination name -> its Dramatiq queues (a queue's one, a topic's subscriptions), in two
    round trips however many destinations there are."""
    destinations = read_records(hash_of(store, keys.messaging_destinations, "destination"), "destination", _destination)
    found = {name: [record["queue"]] for name, record in destinations.items() if record["kind"] == "queue"}
    topics = sorted(name for name, record in destinations.items() if record["kind"] == "topic")
    if topics:
        pipe = store.pipeline(transaction=False)
        for name in topics:
            pipe.hkeys(keys.messaging_subscriptions(name))
        for name, queues in zip(topics, pipe.execute(raise_on_error=False), strict=True):
            found[name] = [] if isinstance(queues, Exception) else sorted(decoded(q) or "" for q in queues)
    return found


def queue_entries(backend: Backend, store: Any, keys: Keys) -> list[dict[str, Any]]:
    destinations = read_records(hash_of(store, keys.messaging_destinations, "destination"), "destination", _destination)
    consumers = live_consumers(store, keys)

    def entry_of(name: str, record: dict[str, Any]) -> dict[str, Any]:
        if record["kind"] == "queue":
            queue = record["queue"]
            entry: dict[str, Any] = {"name": name, "kind": "queue", "broker": backend.kind, "queue": queue}
            entry.update(_queue_numbers(backend, store, keys, queue, consumers))
            entry["consumers"] = sum(1 for c in consumers.values() if queue in c.get("queues", ()))
            return entry
        subscriptions = []
        found = read_records(hash_of(store, keys.messaging_subscriptions(name), "subscription"), f"{name} subscription",
                             _subscription)
        for queue, sub in sorted(found.items()):
            item = {"queue": queue, "durable_name": sub.get("durable"), "owner": sub.get("owner")}
            item.update(_queue_numbers(backend, store, keys, queue, consumers))
            subscriptions.append(item)
        return {"name": name, "kind": "topic", "broker": backend.kind, "subscriptions": subscriptions,
                "consumers": sum(1 for c in consumers.values()
                                 if any(s["queue"] in c.get("queues", ()) for s in subscriptions))}

    entries = read_records(destinations, "destination", entry_of)
    return [entries[name] for name in sorted(entries)]


def _queue_numbers(backend: Backend, store: Any, keys: Keys, queue: str,
                   consumers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    numbers: dict[str, Any] = dict(backend.queue_stats(None, queue))
    if numbers.get("in_flight") is None and backend.kind == "rabbitmq":
        numbers["in_flight"] = sum(int(c.get("prefetched", {}).get(queue, 0)) for c in consumers.values())
    rejected = numbers.pop("rejected", 0)  # in the broker's own dead-letter queue: dead as well
    numbers["dead"] = int(store.hlen(keys.messaging_dead(queue))) + int(rejected or 0)
    return numbers
