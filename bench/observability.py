"""Messaging throughput with tracing and metrics on vs off, in one run (a benchmark, not a test).

    python bench/observability.py [--messages 2000] [--threads 8] [--rounds 6]

The same publish-and-consume loop as ``bench/messaging.py`` (one process publishes as fast as it
can to ``/queue/bench`` and its own app runtime's worker threads consume, on a private embedded
store), run in turn by apps in one process:

- **off**: ``IMMUTANT_TRACING=off`` (and ``IMMUTANT_METRICS=0`` when this checkout has it);
- **on**: ``IMMUTANT_TRACING=on`` with OpenTelemetry's SDK configured as a user would, a
  TracerProvider with a BatchSpanProcessor to an exporter that drops the spans (so the figure is
  our instrumentation and the SDK, not a collector's network), every trace sampled; and
  ``IMMUTANT_METRICS=1`` when this checkout has that setting;
- **on, 10%**: the same with the sampler production setups use, ``ParentBased(TraceIdRatioBased(0.1))``.

Each message gets a PRODUCER span when published and a CONSUMER span when handled. One round runs
the three back to back, in a rotating order; the ratio to "off" is taken within each round (one
machine load) and the median over rounds is printed, with the best round of each and the CPU time
of this process per message (the publisher and the consumers share it: the GIL-bound cost).
Target: ratio >= 0.95.
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
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, SamplingResult, TraceIdRatioBased

from flask_immutant import ImmutantExtension, ImmutantState
from flask_immutant.messaging import messaging_for
from flask_immutant.messaging.codec import decode, envelope
from flask_immutant.store import EmbeddedStore
from flask_immutant.tracing.spans import Tracing

#: mode -> (tracing and metrics on, sampler)
MODES: dict[str, tuple[bool, Sampler]] = {
    "off": (False, ParentBased(ALWAYS_ON)),
    "on": (True, ParentBased(ALWAYS_ON)),
    "on, 10%": (True, ParentBased(TraceIdRatioBased(0.1))),
}


class DroppingExporter(SpanExporter):
    """Counts the spans the BatchSpanProcessor hands over, and drops them."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class Switchable(Sampler):
    """The provider's sampler, switched between rounds (OpenTelemetry allows one global provider)."""

    def __init__(self) -> None:
        self.inner: Sampler = ParentBased(ALWAYS_ON)

    def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
        return self.inner.should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return self.inner.get_description()


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
        cpu = time.process_time()
        started = time.perf_counter()
        for n in range(messages):
            messaging.publish("/queue/bench", n)
        published = time.perf_counter()
        if not sink.done.wait(300):
            raise SystemExit(f"only {sink.count} of {messages} messages arrived")
        return {"publish_per_s": messages / (published - started),
                "throughput_per_s": messages / (sink.last - started),
                "cpu_us": (time.process_time() - cpu) / messages * 1e6}
    finally:
        hooks(state, "immutant_runtime_stopping", runtime)


def span_cost(messages: int) -> float:
    """CPU microseconds the two spans of one message cost (publish, then handle), measured alone
    in a loop on this thread: a figure the machine's other load hardly moves."""
    tracing = Tracing("bench")
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _n in range(messages):
            with tracing.producing("/queue/bench", "redis", 1) as span:
                message = decode(envelope("/queue/bench", 1, trace=span.carrier), message_id="m")
            with tracing.processing(message, "redis", None):
                pass
        best = min(best, (time.thread_time() - started) / messages * 1e6)
    return best


def span_cost_baseline(messages: int) -> float:
    """:func:`span_cost`'s loop without the spans (the envelope and its decoding)."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        for _n in range(messages):
            decode(envelope("/queue/bench", 1, trace=None), message_id="m")
        best = min(best, (time.thread_time() - started) / messages * 1e6)
    return best


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
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the three modes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    exporter = DroppingExporter()
    sampler = Switchable()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    home = Path(tempfile.mkdtemp(prefix="imt-bench-obs-"))
    store = EmbeddedStore(home)
    store.ensure_running()
    names = list(MODES)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    try:
        run(home, True, args.threads, 200)  # warm up: imports, scripts, the SDK's export thread
        for round_ in range(args.rounds):
            for name in names[round_ % 3:] + names[:round_ % 3]:
                on, sampler.inner = MODES[name]
                results[name].append(run(home, on, args.threads, args.messages))
        costs = {}
        for name in names[1:]:
            sampler.inner = MODES[name][1]
            costs[name] = span_cost(args.messages)
        baseline = span_cost_baseline(args.messages)
    finally:
        store.stop()
    provider.force_flush()
    metrics = "metrics on" if has_metrics() else "no IMMUTANT_METRICS setting in this checkout"
    print(f"\n== Redis (embedded store): {args.messages} messages, {args.threads} worker threads, {args.rounds} "
          f"rounds; on = tracing (SDK, BatchSpanProcessor, dropping exporter) + {metrics} ==")
    for name in names:
        runs = results[name]
        best = max(runs, key=lambda r: r["throughput_per_s"])
        print(f"{name:>8}: publish+consume {best['throughput_per_s']:6.0f}/s best, "
              f"{statistics.median(r['throughput_per_s'] for r in runs):6.0f}/s median;  "
              f"CPU {statistics.median(r['cpu_us'] for r in runs):5.0f} us/message median")
    print(f"spans exported: {exporter.exported}")
    off_cpu = statistics.median(r["cpu_us"] for r in results["off"])
    for name, cost in costs.items():
        extra = cost - baseline
        print(f"    the spans of one message ({name}), alone: {extra:5.1f} us CPU (envelope and decode without "
              f"them: {baseline:.1f} us); against off's {off_cpu:.0f} us per message: "
              f"ratio {off_cpu / (off_cpu + extra):.3f}")
    for name in names[1:]:
        ratios = [on["throughput_per_s"] / off["throughput_per_s"]
                  for on, off in zip(results[name], results["off"], strict=True)]
        cpu = statistics.median(r["cpu_us"] for r in results["off"]) / statistics.median(
            r["cpu_us"] for r in results[name])
        print(f"    ratio ({name} / off, publish+consume throughput): median of rounds {statistics.median(ratios):.3f} "
              f"(rounds: {' '.join(f'{r:.2f}' for r in ratios)}); CPU per message, off / {name}: {cpu:.3f}  "
              "(target >= 0.95)")


if __name__ == "__main__":
    main()
