"""Messaging throughput with tracing and metrics on vs off, in one run (a benchmark, not a test).

    python bench/observability.py [--messages 2000] [--threads 8] [--rounds 8]

The same publish-and-consume loop as ``bench/messaging.py`` (one process publishes as fast as it
can to ``/queue/bench`` and its own app runtime's worker threads consume, on a private embedded
store), run alternately by two apps in one process:

- **on**: ``IMMUTANT_TRACING=on`` with OpenTelemetry's SDK configured as a user would, a
  TracerProvider with a BatchSpanProcessor to an exporter that drops the spans (so the figure is
  our instrumentation and the SDK, not a collector's network), and ``IMMUTANT_METRICS=1`` when
  this checkout has that setting;
- **off**: ``IMMUTANT_TRACING=off`` (and ``IMMUTANT_METRICS=0``).

Each message gets a PRODUCER span when published and a CONSUMER span when handled. Rounds run in
back-to-back pairs (on then off, off then on, alternately); prints the best and median round of
each, and the on/off ratio of publish+consume throughput: the median of the pairs' ratios, and
best against best (target >= 0.95).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from flask_immutant import ImmutantExtension, ImmutantState
from flask_immutant.messaging import messaging_for
from flask_immutant.store import EmbeddedStore


class DroppingExporter(SpanExporter):
    """Counts the spans the BatchSpanProcessor hands over, and drops them."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class Sink:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.last = 0.0

    def __call__(self, body: Any) -> None:
        with self.lock:
            self.count += 1
            self.last = time.perf_counter()
            if self.count >= self.expected:
                self.done.set()


def has_metrics() -> bool:
    return "IMMUTANT_METRICS" in ImmutantState.build({}, environ={}).settings


def run(home: Path, on: bool, threads: int, messages: int) -> dict[str, float]:
    """One round: an app with observability ``on`` or off publishes and consumes ``messages``."""
    app = Flask(f"bench-obs-{'on' if on else 'off'}")
    app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=f"obs{uuid.uuid4().hex[:6]}",
                      IMMUTANT_WORKER_THREADS=threads, IMMUTANT_TRACING="on" if on else "off")
    if has_metrics():
        app.config["IMMUTANT_METRICS"] = on
    ImmutantExtension(app)
    messaging = messaging_for(app)
    box = [Sink(0)]
    messaging.listen("/queue/bench", lambda body: box[0](body))
    state = messaging.state
    runtime = SimpleNamespace(app=app, state=state, settings=state.settings)
    state.runtime = runtime  # type: ignore[assignment]
    hooks(state, "immutant_runtime_started", runtime)
    try:
        time.sleep(0.5)
        sink = box[0] = Sink(messages)
        started = time.perf_counter()
        for n in range(messages):
            messaging.publish("/queue/bench", n)
        published = time.perf_counter()
        if not sink.done.wait(300):
            raise SystemExit(f"only {sink.count} of {messages} messages arrived")
        return {"publish_per_s": messages / (published - started),
                "throughput_per_s": messages / (sink.last - started)}
    finally:
        hooks(state, "immutant_runtime_stopping", runtime)


def hooks(state: ImmutantState, name: str, runtime: Any) -> None:
    """Call hook ``name`` of the messaging and metrics plugins only: no HTTP server, daemons or
    contexts run here, only what the measured path touches."""
    for impl in getattr(state.pm.hook, name).get_hookimpls():
        if any(word in impl.plugin_name for word in ("messaging", "metrics")):
            impl.function(runtime=runtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="pairs of rounds (one on, one off)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    exporter = DroppingExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    home = Path(tempfile.mkdtemp(prefix="imt-bench-obs-"))
    store = EmbeddedStore(home)
    store.ensure_running()
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    try:
        run(home, True, args.threads, 200)  # warm up: imports, scripts, the SDK's export thread
        for round_ in range(args.rounds):  # alternated, so neither always runs on a warmer machine
            for on in ((False, True) if round_ % 2 == 0 else (True, False)):
                results["on" if on else "off"].append(run(home, on, args.threads, args.messages))
    finally:
        store.stop()
    provider.force_flush()
    metrics = "metrics on" if has_metrics() else "no IMMUTANT_METRICS setting in this checkout"
    print(f"\n== Redis (embedded store): {args.messages} messages, {args.threads} worker threads, "
          f"best of {args.rounds}; on = tracing (SDK, BatchSpanProcessor, dropping exporter) + {metrics} ==")
    best = {name: max(runs, key=lambda r: r["throughput_per_s"]) for name, runs in results.items()}
    for name in ("off", "on"):
        median = statistics.median(r["throughput_per_s"] for r in results[name])
        print(f"{name:>4}: publish {best[name]['publish_per_s']:8.0f}/s  publish+consume "
              f"{best[name]['throughput_per_s']:8.0f}/s best, {median:8.0f}/s median")
    # Each pair ran back to back, so its ratio sees one machine load: the median of those is the
    # figure to read on a shared machine; best-of is printed too.
    pairs = [on["throughput_per_s"] / off["throughput_per_s"] for on, off in zip(results["on"], results["off"],
                                                                                   strict=True)]
    ratio = best["on"]["throughput_per_s"] / best["off"]["throughput_per_s"]
    print(f"spans exported: {exporter.exported}; pair ratios: {' '.join(f'{r:.2f}' for r in pairs)}")
    print(f"    ratio (on / off, publish+consume throughput): median of pairs {statistics.median(pairs):.3f}, "
          f"best vs best {ratio:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
