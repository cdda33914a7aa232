"""The past minutes, for the console's charts: one cluster sample per slot, in a capped stream.

Every node supervisor runs a :class:`Sampler`; each ``every`` seconds (store clock) one of them
claims the slot (``SET NX``) and writes one sample built from the status document the console
shows: per queue its depth, in flight, dead and handled so far (``mq-handled``, added by each
consumer's heartbeat), per node the load factor of its busiest context. So history exists as
long as any node runs, whether a console is open or not, and the charts of a console started now
already show the past hour. Throughput is the difference of ``handled`` between two samples.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import redis

from ..keys import Keys
from ..loops import Loop
from ..protocols import Slot
from ..records import MALFORMED, decoded, from_json, shown, warn

if TYPE_CHECKING:
    from ..state import ImmutantState

log = logging.getLogger(__name__)

#: Seconds between samples.
SAMPLE_EVERY = 5.0
#: Samples kept (an hour at the default interval).
SAMPLES_KEPT = 720


def sample_of(status: dict[str, Any], handled: dict[str, int]) -> dict[str, Any]:
    """The sample of one status document: ``{"queues": {label: {...}}, "nodes": {node: load}}``."""
    queues: dict[str, dict[str, Any]] = {}
    for entry in status.get("queues") or []:
        subscriptions = entry.get("subscriptions") or []
        rows = [(entry["name"], entry)] if entry.get("kind") == "queue" else [
            (f"{entry['name']} [{sub.get('durable_name') or 'subscriber'}]", sub) for sub in subscriptions]
        for label, row in rows:
            queues[label] = {"depth": row.get("depth"), "in_flight": row.get("in_flight"), "dead": row.get("dead"),
                             "handled": handled.get(str(row.get("queue")), 0)}
    nodes: dict[str, int] = {}
    for context in status.get("contexts") or []:
        node, load = context.get("node"), context.get("load")
        if isinstance(node, str) and isinstance(load, int):
            nodes[node] = min(load, nodes.get(node, 100))
    for member in status.get("members") or []:
        nodes.setdefault(member["name"], 100)
    return {"queues": queues, "nodes": nodes}


def _handled(store: redis.Redis, keys: Keys) -> dict[str, int]:
    from ..records import hash_of, read_records

    return read_records(hash_of(store, keys.messaging_handled, "handled count"), "handled count",
                        lambda _name, raw: int(raw))


class Sampler:
    """Writes a sample when this node wins the slot; any node may, exactly one does per slot."""

    def __init__(self, state: ImmutantState, every: float = SAMPLE_EVERY, kept: int = SAMPLES_KEPT) -> None:
        self.state = state
        self.every = every
        self.kept = kept
        self.loop = Loop("history", self.step, every / 2)

    def step(self) -> None:
        store, keys = self.state.store, self.state.keys
        seconds, micros = store.time()
        slot = int((seconds + micros / 1e6) // self.every)
        if not store.set(keys.history_slot(slot), self.state.node_name or "-", nx=True, px=int(self.every * 4000)):
            return
        sample = {**sample_of(self.state.status(), _handled(store, keys)), "slot": slot}
        store.xadd(keys.history, {"sample": json.dumps(sample, sort_keys=True)}, maxlen=self.kept, approximate=True)

    def start(self) -> Sampler:
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()


#: A node supervisor's sampler.
SAMPLER: Slot[Sampler] = Slot("history")


def read_history(store: redis.Redis, keys: Keys, since: float) -> list[dict[str, Any]]:
    """The samples since ``since`` (epoch seconds, store clock), oldest first, each with its ``t``
    (store time, seconds); malformed entries are skipped with a warning naming them."""
    try:
        entries: Any = store.xrange(keys.history, f"{int(since * 1000)}-0", "+")
    except redis.ResponseError as exc:
        warn(f"skipped the history: {keys.history} is not a stream ({exc})")
        return []
    samples = []
    for raw_id, raw in entries or ():
        try:
            entry_id = decoded(raw_id) or ""
            data = from_json({decoded(k): v for k, v in raw.items()}["sample"])
            if not isinstance(data, dict) or not isinstance(data.get("queues"), dict) \
                    or not isinstance(data.get("nodes"), dict):
                raise TypeError("not a sample object")
            samples.append({**data, "t": int(entry_id.split("-")[0]) / 1000.0})
        except MALFORMED as exc:
            warn(f"skipped the history sample {shown(raw_id)}: {type(exc).__name__}: {exc}")
    return samples
