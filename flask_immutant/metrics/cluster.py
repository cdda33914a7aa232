"""What a scrape reads from the cluster store rather than from recorded values: queue depths,
this node's deployments and contexts, the cluster's size.

A reading is a handful of pipelined round trips, whatever the number of destinations. In a
runtime with a hundred threads each round trip also waits for the GIL, so a scrape does not wait
for them: it serves the last reading and, when that is older than :data:`FRESH_FOR`, starts the
next one in the background (only the first scrape reads in line). With Prometheus scraping every
few seconds the values are one scrape old at most. A part that fails to read is left out of that
reading (logged at DEBUG); the rest is still served."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..records import decoded, json_object, read_records, required
from ..store.outage import STORE_ERRORS
from . import definitions as m
from .metric import Metric

if TYPE_CHECKING:
    from ..extension import ImmutantState

log = logging.getLogger("flask_immutant.metrics")
#: A scraped metric's values: label values (in the metric's label order) and the value.
Samples = list[tuple[tuple[str, ...], float]]
#: Seconds a reading of the store serves scrapes before a scrape starts the next one.
FRESH_FOR = 1.0


class ClusterCollector:
    """A prometheus_client custom collector over one app's state (its store, keys, node name)."""

    def __init__(self, state: ImmutantState, fresh_for: float = FRESH_FOR) -> None:
        self.state = state
        self.fresh_for = fresh_for
        self._lock = threading.Lock()
        self._reading_done: tuple[list[Any], bytes] | None = None
        self._read_at = 0.0
        self._reading = False

    def collect(self) -> Iterator[Any]:
        """The last reading; a stale one is replaced in the background for the next scrape."""
        return iter(self._last()[0])

    def exposition(self) -> bytes:
        """The last reading as exposition text, rendered once per reading (by the thread that
        read it, so a scrape served from it only joins bytes); refreshed as :meth:`collect` is."""
        return self._last()[1]

    def _last(self) -> tuple[list[Any], bytes]:
        with self._lock:
            last = self._reading_done
            start = last is not None and not self._reading and time.monotonic() - self._read_at >= self.fresh_for
            self._reading = self._reading or start
        if last is None:
            return self.read_and_render()
        if start:
            threading.Thread(target=self._read_in_background, name="immutant-metrics-read", daemon=True).start()
        return last

    def read(self) -> list[Any]:
        """Read everything now and keep it as the last reading."""
        return self.read_and_render()[0]

    def read_and_render(self) -> tuple[list[Any], bytes]:
        """Read everything now, render it, and keep both as the last reading."""
        from prometheus_client import generate_latest

        families: list[Any] = []
        for read in (self._members, self._deployments, self._load_factors, self._queues):
            try:
                families += read()
            except STORE_ERRORS as exc:
                log.debug("metrics: %s left out of this reading: %s", read.__name__.lstrip("_"), exc)
        done = (families, generate_latest(_Families(families)))
        with self._lock:
            self._reading_done, self._read_at, self._reading = done, time.monotonic(), False
        return done

    def _read_in_background(self) -> None:
        try:
            self.read()
        except Exception:  # a malformed record, a bug: the next scrape tries again
            log.exception("metrics: reading the cluster store failed")
            with self._lock:
                self._reading = False

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
        """Depth and dead letters of every destination: three round trips to the store and one
        to the broker (pipelined on Redis), however many destinations there are. A destination
        whose queues the broker did not count is left out (unknown is not 0), and
        ``immutant_broker_up`` says so."""
        from ..messaging.core import messaging_of
        from ..messaging.status import destination_queues
        from ..state import FEATURE_FLAGS

        if not self.state.pm.has_plugin(FEATURE_FLAGS["messaging"][0]):
            return []  # messaging is off for this app: it has no queues to count
        # Made on first use, not when the app is initialised (docs/design.md, lazy imports): an
        # app that has not published yet, or a runtime still starting, may have none so far.
        messaging = messaging_of(self.state)
        store, keys = self.state.store, self.state.keys
        queues_of = destination_queues(store, keys)
        every = [queue for queues in queues_of.values() for queue in queues]
        counts: dict[str, tuple[int, int] | None]
        try:
            counts = messaging.backend.counts(every)
        except Exception as exc:  # the broker's own errors (redis, pika, sockets): unknown, not 0
            log.debug("metrics: the broker did not count its queues: %s", exc)
            counts = dict.fromkeys(every)
        pipe = store.pipeline(transaction=False)
        for queue in every:
            pipe.hlen(keys.messaging_dead(queue))
        dead = dict(zip(every, (int(n) for n in pipe.execute()), strict=True))
        depths: Samples = []
        buried: Samples = []
        for name, queues in sorted(queues_of.items()):
            known = [counted for counted in (counts.get(q) for q in queues) if counted is not None]
            if len(known) == len(queues):
                depths.append(((name,), float(sum(waiting for waiting, _ in known))))
                buried.append(((name,), float(sum(dead[q] for q in queues) + sum(rejected for _, rejected in known))))
        up = float(all(counts.get(q) is not None for q in every))
        return [family(m.QUEUE_DEPTH, depths), family(m.QUEUE_DEAD, buried), family(m.BROKER_UP, [((), up)])]


class _Families:
    """A reading's families as a prometheus_client collector (to render them)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


def _state(name: str, raw: Any) -> str:
    record = json_object(name, raw)
    required(record, {"state": str})
    return str(record["state"])


def family(metric: Metric, samples: Samples) -> Any:
    """A prometheus_client gauge family for a scraped ``metric``."""
    from prometheus_client.core import GaugeMetricFamily

    gauge = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
    for labels, value in samples:
        gauge.add_metric(list(labels), value)
    return gauge
