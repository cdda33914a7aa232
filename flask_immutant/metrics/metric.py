"""One metric: its definition, and the prometheus_client object behind it once metrics are on.

Call sites hold a :class:`Metric` from :mod:`.definitions` and call ``inc``/``dec``/``set``/
``observe`` on it, one line each. Until this process turns metrics on (:func:`.process.enable`),
each call is a no-op costing one attribute read, and prometheus_client is never imported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]
GaugeMode = Literal["livesum", "livemax", "liveall"]
log = logging.getLogger("flask_immutant.metrics")


@dataclass(eq=False)
class Metric:
    """``name`` is the name Prometheus sees (counters end in ``_total``). A ``scraped`` metric is
    read from the cluster store when Prometheus asks (:mod:`.cluster`), never recorded here."""

    kind: Kind
    name: str
    help: str
    labels: tuple[str, ...] = ()
    #: Histogram buckets, in seconds.
    buckets: tuple[float, ...] | None = None
    #: How a gauge's values from several processes of one node combine (prometheus_client's
    #: ``multiprocess_mode``): ``livesum`` adds the living processes', ``livemax`` takes their largest.
    mode: GaugeMode = "livesum"
    scraped: bool = False
    _live: Any = field(default=None, repr=False)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if self._live is not None:
            self._record("inc", labels, amount)

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        if self._live is not None:
            self._record("dec", labels, amount)

    def set(self, value: float, *labels: str) -> None:
        if self._live is not None:
            self._record("set", labels, value)

    def observe(self, value: float, *labels: str) -> None:
        if self._live is not None:
            self._record("observe", labels, value)

    def _record(self, how: str, labels: tuple[str, ...], value: float) -> None:
        """A metric never raises into the code it measures: the first failure (the multi-process
        folder gone, no file descriptor left, a bad label) is logged and the metric goes quiet."""
        live = self._live
        try:
            getattr(live.labels(*labels) if labels else live, how)(value)
        except Exception:
            self._live = None
            log.warning("metrics: %s stopped recording in this process (no more values until restart)",
                        self.name, exc_info=True)

    def forget(self, **labels: str) -> None:
        """Drop every series whose labels include ``labels`` (a backend that left): in-memory
        registries only, as prometheus_client cannot remove series in multi-process mode."""
        live = self._live
        if live is None or not self.labels or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        try:
            live.remove_by_labels(labels)
        except Exception:
            log.debug("metrics: could not forget %s %s", self.name, labels, exc_info=True)

    def bind(self, registry: Any) -> None:
        """Create the prometheus_client object (in ``registry``; ``None`` in multi-process mode,
        where each process writes its values to files and the scrape reads the files)."""
        if self.scraped:
            return
        import prometheus_client as prom

        options: dict[str, Any] = {"labelnames": self.labels, "registry": registry}
        if self.kind == "counter":
            self._live = prom.Counter(self.name.removesuffix("_total"), self.help, **options)
        elif self.kind == "gauge":
            self._live = prom.Gauge(self.name, self.help, multiprocess_mode=self.mode, **options)
        else:
            self._live = prom.Histogram(self.name, self.help, buckets=self.buckets or prom.Histogram.DEFAULT_BUCKETS,
                                        **options)

    def unbind(self) -> None:
        self._live = None
