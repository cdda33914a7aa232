"""An app whose node processes record their spans, for tests/test_tracing.py and test_logs.py.

Each process (node supervisor, app runtime) configures OpenTelemetry's SDK the way a user would:
a TracerProvider exporting to the SDK's in-memory exporter, and Flask's own instrumentation for
incoming requests. ``GET /spans`` returns what the runtime finished. The node named ``consumer``
handles the messages; the others publish them (from requests, a daemon and a job).
"""

import logging
import os

from flask import Flask, jsonify
from opentelemetry import trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flask_immutant import ImmutantExtension, daemons, jobs, messaging

EXPORTER = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(provider)

app = Flask("traced")
FlaskInstrumentor().instrument_app(app)
ImmutantExtension(app)
NODE = os.environ.get("IMMUTANT_NODE_NAME")
log = logging.getLogger("traced")


def ids() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


@app.get("/publish/<int:n>")
def publish(n: int):
    messaging.publish("/queue/traced", n)
    return ids()


@app.get("/ask/<int:n>")
def ask(n: int):
    return {"answer": messaging.request("/queue/ask", n, timeout=30).result(), **ids()}


@app.get("/stop-ticker")
def stop_ticker():
    return {"stopped": daemons.stop("ticker")}


@app.get("/spans")
def spans():
    return jsonify([{
        "name": span.name, "kind": span.kind.name, "pid": os.getpid(), "node": NODE,
        "trace_id": format(span.context.trace_id, "032x"), "span_id": format(span.context.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "attributes": dict(span.attributes or {}),
    } for span in EXPORTER.get_finished_spans()])


def handle(body):
    log.info("handled %s on %s", body, NODE)


def tick(ctx):
    messaging.publish("/queue/traced", "tick")
    while not ctx.wait(0.2):
        pass


def tock():
    messaging.publish("/queue/traced", "tock")


if NODE == "consumer":
    messaging.listen("/queue/traced", handle, app=app)
    messaging.respond("/queue/ask", lambda n: n * 2, app=app)
else:
    daemons.declare("ticker", tick, app=app)
    jobs.schedule("tock", tock, every=0.5, limit=1, singleton=False, app=app)
