"""What a scrape reads from the cluster store rather than from recorded values: queue depths,
this node's deployments and contexts, the cluster's size. Each is a few pipelined reads (kept
cheap: ``bench/metrics_scrape.py``); one that fails is left out of that scrape, logged once at
DEBUG, and the rest is still served."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..records import decoded, json_object, read_records, required
from ..store.outage import STORE_ERRORS
from . import definitions as m
from .metric import Metric

if TYPE_CHECKING:
    from ..extension import ImmutantState

log = logging.getLogger("flask_immutant.metrics")


class ClusterCollector:
    """A prometheus_client custom collector over one app's state (its store, keys, node name)."""

    def __init__(self, state: ImmutantState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        for read in (self._members, self._deployments, self._load_factors, self._queues):
            try:
                families = read()
            except STORE_ERRORS as exc:
                log.debug("metrics: %s left out of this scrape: %s", read.__name__.lstrip("_"), exc)
                continue
            yield from families

    def _members(self) -> list[Any]:
        return [family(m.MEMBERS, [((), float(len(self.state.members())))])]

    def _deployments(self) -> list[Any]:
        store, keys, node = self.state.store, self.state.keys, self.state.node_name
        names = [decoded(raw) or "" for raw in store.hkeys(keys.deployments)]
        pipe = store.pipeline(transaction=False)
        for name in names:
            pipe.hget(keys.deployment_nodes(name), node)
        found = {name: raw for name, raw in zip(names, pipe.execute(), strict=True) if raw is not None}
        states = read_records(found, "deployment node state", _state)
        return [family(m.DEPLOYMENT_STATE, [((name, state), 1.0) for name, state in sorted(states.items())])]

    def _load_factors(self) -> list[Any]:
        from ..contexts.registry import contexts

        node = self.state.node_name
        return [family(m.LOAD_FACTOR, [((c.context_path,), float(c.load))
                                       for c in contexts(self.state.store, self.state.keys) if c.node == node])]

    def _queues(self) -> list[Any]:
        from ..messaging.plugin import FEATURE as MESSAGING
        from ..messaging.status import queue_entries

        messaging = self.state.features.get(MESSAGING)
        if messaging is None:
            return []

        entries = queue_entries(messaging.backend, self.state.store, self.state.keys)
        return [family(m.QUEUE_DEPTH, [((e["name"],), float(_summed(e, "depth"))) for e in entries]),
                family(m.QUEUE_DEAD, [((e["name"],), float(_summed(e, "dead"))) for e in entries])]


def _state(name: str, raw: Any) -> str:
    record = json_object(name, raw)
    required(record, {"state": str})
    return str(record["state"])


def _summed(entry: dict[str, Any], field: str) -> int:
    if entry["kind"] == "queue":
        return int(entry.get(field) or 0)
    return sum(int(sub.get(field) or 0) for sub in entry.get("subscriptions", ()))


def family(metric: Metric, samples: list[tuple[tuple[str, ...], float]]) -> Any:
    """A prometheus_client gauge family for a scraped ``metric``."""
    from prometheus_client.core import GaugeMetricFamily

    gauge = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
    for labels, value in samples:
        gauge.add_metric(list(labels), value)
    return gauge
