"""One metric: its definition, and the prometheus_client object behind it once metrics are on.

Call sites hold a :class:`Metric` from :mod:`.definitions` and call ``inc``/``dec``/``set``/
``observe`` on it, one line each. Until this process turns metrics on (:func:`.process.enable`),
each call is a no-op costing one attribute read, and prometheus_client is never imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["counter", "gauge", "histogram"]
GaugeMode = Literal["livesum", "livemax", "liveall"]


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
        live = self._live
        if live is not None:
            (live.labels(*labels) if labels else live).inc(amount)

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        live = self._live
        if live is not None:
            (live.labels(*labels) if labels else live).dec(amount)

    def set(self, value: float, *labels: str) -> None:
        live = self._live
        if live is not None:
            (live.labels(*labels) if labels else live).set(value)

    def observe(self, value: float, *labels: str) -> None:
        live = self._live
        if live is not None:
            (live.labels(*labels) if labels else live).observe(value)

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
