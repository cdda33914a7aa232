"""Traces across the cluster (issue 15, part 3): one trace from a Flask request on one node to the
listener that handles its message on another, in two real node processes that each export to the
SDK's in-memory exporter; spans of daemon runs and job fires; W3C context in the envelope; and the
package without the otel extra."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flask_immutant import ImmutantState
from flask_immutant.errors import ImmutantConfigError
from flask_immutant.messaging.codec import Message, decode
from flask_immutant.messaging.plugin import messaging_of
from flask_immutant.tracing import tracing_of
from flask_immutant.tracing.spans import Tracing

from support import NodeProcess, wait_until

APP = Path(__file__).parent / "apps" / "traced_app.py"


# --- two nodes, one trace -----------------------------------------------------------------------


@pytest.fixture
def nodes(start_node: Callable[..., NodeProcess], node_env: dict[str, str]) -> dict[str, tuple[NodeProcess, str]]:
    """``web`` publishes (requests, a daemon, a job); ``consumer`` handles: name -> (process, base URL)."""
    started = {}
    for offset, name in enumerate(("web", "consumer")):
        process = start_node("--clustered", "--node-name", name, "--port-offset", str(100 * offset), app=str(APP),
                             env={"IMMUTANT_FAILURE_TIMEOUT": "1"})
        started[name] = (process, f"http://127.0.0.1:{int(node_env['IMMUTANT_HTTP_PORT']) + 100 * offset}")
    started["consumer"][0].wait_for(r"messaging: consuming /queue/traced\b", timeout=40)
    started["web"][0].wait_for(r"joined cluster", timeout=40)
    return started


def spans_of(base: str) -> list[dict[str, Any]]:
    response = requests.get(f"{base}/spans", timeout=10)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def one(spans: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    return found[0] if len(found) == 1 else None


def test_a_request_that_publishes_and_the_handler_on_another_node_share_one_trace(nodes):
    web, consumer = nodes["web"][1], nodes["consumer"][1]
    # Given a request to the web node that publishes 7
    published = requests.get(f"{web}/publish/7", timeout=30).json()
    # When the consumer node has handled it
    nodes["consumer"][0].wait_for(r"handled 7 on consumer", timeout=30)
    process = wait_until(lambda: next((s for s in spans_of(consumer) if s["name"] == "process /queue/traced"
                                       and s["trace_id"] == published["trace_id"]), None), timeout=10)
    # Then the web node has Flask's server span and, under it, our PRODUCER span
    web_spans = spans_of(web)
    server = one(web_spans, span_id=published["span_id"])
    assert server is not None and server["kind"] == "SERVER", web_spans
    producer = one(web_spans, name="publish /queue/traced", trace_id=published["trace_id"])
    assert producer is not None and producer["kind"] == "PRODUCER" and producer["parent_id"] == server["span_id"]
    assert producer["attributes"]["messaging.destination.name"] == "/queue/traced"
    assert producer["attributes"]["messaging.operation.type"] == "send"
    assert producer["attributes"]["messaging.system"] == "redis"
    # And the consumer node's CONSUMER span is the producer's child: one trace, two processes
    assert process["kind"] == "CONSUMER" and process["parent_id"] == producer["span_id"]
    assert process["pid"] != producer["pid"] and process["node"] == "consumer" and producer["node"] == "web"
    assert process["attributes"]["messaging.operation.type"] == "process"
    assert process["attributes"]["messaging.message.id"]
    assert process["attributes"]["immutant.node"] == "consumer"


def test_a_request_and_its_response_share_one_trace(nodes):
    web, consumer = nodes["web"][1], nodes["consumer"][1]
    # Given a request that asks the consumer node and waits for the answer
    asked = requests.get(f"{web}/ask/21", timeout=40).json()
    assert asked["answer"] == 42
    # Then the responder ran in a CONSUMER span under the request's PRODUCER span
    producer = one(spans_of(web), name="publish /queue/ask", trace_id=asked["trace_id"])
    assert producer is not None and producer["parent_id"] == asked["span_id"]
    assert producer["attributes"]["messaging.message.conversation_id"]
    responder = wait_until(lambda: one(spans_of(consumer), name="process /queue/ask", trace_id=asked["trace_id"]),
                           timeout=10)
    assert responder["parent_id"] == producer["span_id"]
    assert responder["attributes"]["messaging.message.conversation_id"] == \
        producer["attributes"]["messaging.message.conversation_id"]


def test_a_daemon_run_and_a_job_fire_are_spans_whose_messages_are_traced_to_the_handler(nodes):
    web, consumer = nodes["web"][1], nodes["consumer"][1]
    nodes["consumer"][0].wait_for(r"handled tick on consumer", timeout=30)
    nodes["consumer"][0].wait_for(r"handled tock on consumer", timeout=30)
    # When the daemon is stopped (its run ends, and so does its span)
    assert requests.get(f"{web}/stop-ticker", timeout=30).json() == {"stopped": True}
    web_spans = spans_of(web)
    # Then its run is a span with the fencing token of that holding, parent of the publish
    run = wait_until(lambda: one(spans_of(web), name="daemon ticker"), timeout=10)
    assert run["parent_id"] is None and run["kind"] == "INTERNAL"
    assert isinstance(run["attributes"]["immutant.daemon.fencing_token"], int)
    assert run["attributes"]["immutant.daemon.singleton"] is True
    # And the job's fire is one too (fired once: limit=1), with its due time
    fire = one(web_spans, name="job tock")
    assert fire is not None and fire["attributes"]["immutant.job.name"] == "tock"
    assert fire["attributes"]["immutant.job.due"] > 0
    # And each one's message was handled on the consumer node in the same trace
    for parent in (run, fire):
        producer = one(spans_of(web), name="publish /queue/traced", trace_id=parent["trace_id"])
        assert producer is not None and producer["parent_id"] == parent["span_id"]
        handled = wait_until(lambda: one(spans_of(consumer), name="process /queue/traced",
                                         trace_id=parent["trace_id"]), timeout=10)  # noqa: B023
        assert handled["parent_id"] == producer["span_id"]


# --- in one process: the envelope ---------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The SDK, configured once for this test process (OpenTelemetry allows one global provider)."""
    found = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(found))
    return found


@pytest.fixture
def publisher(node_env: dict[str, str]) -> Iterator[Any]:
    state = ImmutantState.build({}, environ=node_env)
    messaging = messaging_of(state)
    try:
        yield messaging
    finally:
        messaging.publisher.close()
        state.store.close()


def _envelopes(messaging: Any, queue: str) -> list[dict[str, Any]]:
    raw = messaging.state.store.hvals(f"{messaging.backend.namespace}:{queue}.msgs")
    return [json.loads(item)["args"][0] for item in raw]


def test_the_envelope_carries_the_producer_spans_w3c_context(exporter, publisher):
    # Given an active span in the publishing process
    with trace.get_tracer("test").start_as_current_span("outer") as outer:
        # When it publishes
        publisher.publish("/queue/envelope", {"n": 1})
    # Then the message carries a traceparent naming the producer span, child of the outer one
    producer = next(s for s in exporter.get_finished_spans() if s.name == "publish /queue/envelope")
    assert producer.parent is not None and producer.parent.span_id == outer.get_span_context().span_id
    [envelope] = _envelopes(publisher, publisher.start("/queue/envelope").queue_name)
    version, trace_id, span_id, flags = envelope["trace"]["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled (the SDK may add W3C level 2's "random" bit)
    assert int(trace_id, 16) == outer.get_span_context().trace_id
    assert int(span_id, 16) == producer.context.span_id
    # And the user's properties are left alone
    assert "properties" not in envelope


def test_publish_many_is_one_producer_span_for_the_batch(exporter, publisher):
    publisher.publish_many("/queue/batch", [1, 2, 3])
    producer = [s for s in exporter.get_finished_spans() if s.name == "publish /queue/batch"]
    assert len(producer) == 1 and producer[0].attributes["messaging.batch.message_count"] == 3
    envelopes = _envelopes(publisher, publisher.start("/queue/batch").queue_name)
    assert {e["trace"]["traceparent"].split("-")[2] for e in envelopes} == {format(producer[0].context.span_id, "016x")}


@pytest.mark.parametrize("trace_field", [[1, 2], "00-abc", {"traceparent": 5}, {"traceparent": "x" * 9000}])
def test_a_malformed_trace_field_is_dropped_not_the_message(trace_field):
    message = decode({"destination": "/queue/x", "body": 1, "trace": trace_field})
    assert message.body == 1 and message.trace == {}


def test_a_garbage_traceparent_starts_a_new_trace(exporter):
    # Given a message whose traceparent is not W3C
    message = Message(body=1, destination="/queue/g", id="m1", trace={"traceparent": "00-zz-yy-01"})
    # When it is processed
    with Tracing("n1").processing(message, "redis", None):
        pass
    # Then its CONSUMER span is a root, not an error
    span = next(s for s in exporter.get_finished_spans() if s.name == "process /queue/g")
    assert span.parent is None and span.attributes["messaging.message.id"] == "m1"


def test_a_raising_handler_marks_its_span_as_an_error(exporter):
    message = Message(body=1, destination="/queue/err", id="m2")
    with pytest.raises(ZeroDivisionError), Tracing("n1").processing(message, "redis", None):
        1 / 0  # noqa: B018
    span = next(s for s in exporter.get_finished_spans() if s.name == "process /queue/err")
    assert span.status.status_code == trace.StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


class BrokenPropagator(TextMapPropagator):
    """An app's propagator that fails both ways."""

    def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
        raise RuntimeError("cannot read")

    def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
        raise RuntimeError("cannot write")

    @property
    def fields(self) -> set[str]:
        return {"broken"}


def test_a_failing_propagator_never_stops_a_publish_or_a_handler(exporter, publisher):
    original = propagate.get_global_textmap()
    propagate.set_global_textmap(BrokenPropagator())
    try:
        # When the app's propagator fails to write, the message still goes out, with no context
        assert publisher.publish("/queue/broken", 1) is not None
        [envelope] = _envelopes(publisher, publisher.start("/queue/broken").queue_name)
        assert "trace" not in envelope
        # And when it fails to read, the handler still runs, in a new trace
        message = Message(body=1, destination="/queue/broken", id="m3", trace={"traceparent": "00-x"})
        with Tracing("n1").processing(message, "redis", None):
            ran = True
        assert ran
    finally:
        propagate.set_global_textmap(original)
    span = next(s for s in exporter.get_finished_spans() if s.name == "process /queue/broken")
    assert span.parent is None


class BrokenProcessor(SpanProcessor):
    """An app's span processor with a bug (or an exporter it calls in line that raises) at ``where``."""

    def __init__(self) -> None:
        self.where = "nowhere"

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self.where == "start":
            raise RuntimeError("processor bug in on_start")

    def on_end(self, span: Any) -> None:
        if self.where == "end":
            raise RuntimeError("processor bug in on_end")


@pytest.fixture(scope="module")
def processor(exporter: InMemorySpanExporter) -> BrokenProcessor:
    broken = BrokenProcessor()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(broken)
    return broken


@pytest.fixture
def broken(processor: BrokenProcessor) -> Iterator[BrokenProcessor]:
    yield processor
    processor.where = "nowhere"


@pytest.mark.parametrize("where", ["start", "end"])
def test_a_raising_span_processor_never_stops_a_publish_nor_sends_it_twice(broken, publisher, where):
    # Given an app whose span processor raises when a span starts, or when it ends (after the send)
    broken.where = where
    # When it publishes
    message_id = publisher.publish(f"/queue/broken-{where}", {"n": 1})
    # Then publish returns (a caller that retried on an exception would send the message again)
    [envelope] = _envelopes(publisher, publisher.start(f"/queue/broken-{where}").queue_name)
    assert message_id is not None and decode(envelope).body == {"n": 1}
    # And a span that could not start still hands its parent's context on, one that could carries its own
    if where == "end":
        assert "traceparent" in envelope["trace"]


@pytest.mark.parametrize("where", ["start", "end"])
def test_a_raising_span_processor_never_stops_a_handler_a_daemon_or_a_job(broken, where):
    broken.where = where
    tracing = Tracing("n1")
    ran = []
    with tracing.processing(Message(body=1, destination="/queue/h", id="m1"), "redis", None):
        ran.append("handler")
    with tracing.daemon_run("d", True, 7):
        ran.append("daemon")
    with tracing.job_fire("j", 0.0, False):
        ran.append("job")
    assert ran == ["handler", "daemon", "job"]
    # And the handler's own exception still reaches its caller (to be retried), not swallowed by the span
    with pytest.raises(ZeroDivisionError), tracing.processing(Message(body=1, destination="/queue/h", id="m2"),
                                                                "redis", None):
        1 / 0  # noqa: B018


def test_only_w3c_trace_context_within_its_limits_is_kept_from_a_message():
    parent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    kept = decode({"destination": "/queue/x", "body": 1, "trace": {
        "traceparent": parent, "tracestate": "k=v", "baggage": "a=1", "x-other": "y", "uber-trace-id": "z"}})
    assert kept.trace == {"traceparent": parent, "tracestate": "k=v", "baggage": "a=1"}
    too_much = {"traceparent": parent + "-more", "tracestate": ",".join(f"k{n}=v" for n in range(33)),
                "baggage": ",".join(f"k{n}=v" for n in range(181))}
    assert decode({"destination": "/queue/x", "body": 1, "trace": too_much}).trace == {}
    assert decode({"destination": "/queue/x", "body": 1, "trace": {"traceparent": "x" * 55}}).trace == {}


def test_a_crafted_baggage_costs_at_most_one_log_line_without_the_senders_newlines(exporter, caplog):
    # Given a message whose baggage holds 170 malformed members, the first with a forged log line
    message = decode({"destination": "/queue/crafted", "body": 1,
                      "trace": {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                                "baggage": "x\nFAKE LOG LINE," + "a," * 169}})
    assert "baggage" in message.trace
    # When it is handled
    with caplog.at_level(logging.DEBUG), Tracing("n1").processing(message, "redis", None):
        pass
    # Then OpenTelemetry's propagator said it in at most one line, and no line holds the sender's newline
    records = [r for r in caplog.records if r.name.startswith(("opentelemetry", "flask_immutant.tracing"))]
    assert len(records) == 1, [r.getMessage()[:100] for r in records]
    assert "\n" not in records[0].getMessage() and "FAKE LOG LINE" in records[0].getMessage()
    # And the trace still continues from the publisher's span
    span = next(s for s in exporter.get_finished_spans() if s.name == "process /queue/crafted")
    assert span.parent is not None and span.parent.span_id == int("b" * 16, 16)


@pytest.mark.parametrize("sampled", [True, False])
def test_the_lone_traceparent_path_writes_and_reads_what_the_default_propagator_does(exporter, sampled):
    # Given OpenTelemetry's default propagator, and a publishing context with no tracestate and no baggage
    assert propagate.get_global_textmap().fields == {"traceparent", "tracestate", "baggage"}
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
    outer = trace.NonRecordingSpan(trace.SpanContext(0xA1, 0xB2, is_remote=True, trace_flags=flags))
    with trace.use_span(outer), Tracing("n1").producing("/queue/lone", "redis", 1) as sent:
        # When a publish writes its carrier, the propagator writes the same for the same context
        expected: dict[str, str] = {}
        propagate.inject(expected)
    assert sent.carrier == expected and list(expected) == ["traceparent"]
    # And a consumer reads from it the parent the propagator reads
    message = Message(body=1, destination="/queue/lone", id="m9", trace=dict(expected))
    with Tracing("n1").processing(message, "redis", None) as handled:
        read = trace.get_current_span(propagate.extract(expected)).get_span_context()
        parent = handled.span.parent if sampled else None
    if sampled:
        assert parent == read
    assert read.trace_id == 0xA1 and read.trace_flags.sampled == sampled


def test_baggage_and_tracestate_still_go_through_the_apps_propagator(exporter, publisher):
    from opentelemetry import baggage, context

    token = context.attach(baggage.set_baggage("tenant", "t1"))
    try:
        publisher.publish("/queue/baggage", 1)
    finally:
        context.detach(token)
    [envelope] = _envelopes(publisher, publisher.start("/queue/baggage").queue_name)
    assert envelope["trace"]["baggage"] == "tenant=t1" and "traceparent" in envelope["trace"]


# --- the setting, and the package without the extra ---------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("ON", "on"), ("0", "off"), (True, "on")])
def test_the_setting_takes_auto_on_off_and_booleans(value, expected):
    assert ImmutantState.build({"IMMUTANT_TRACING": value}, environ={}).settings["IMMUTANT_TRACING"] == expected


def test_a_bad_tracing_value_names_what_is_allowed():
    with pytest.raises(ImmutantConfigError, match=r"IMMUTANT_TRACING='maybe' .* auto, on or off"):
        ImmutantState.build({"IMMUTANT_TRACING": "maybe"}, environ={})


def test_tracing_off_is_no_tracing():
    assert tracing_of(ImmutantState.build({"IMMUTANT_TRACING": "off"}, environ={})) is None


WITHOUT_OTEL = r'''
import sys
sys.modules["opentelemetry"] = None  # as if the otel extra were not installed: importing it fails
from flask import Flask
from flask_immutant import ImmutantExtension, ImmutantState
from flask_immutant.errors import ImmutantConfigError
from flask_immutant.tracing import tracing_of
from flask_immutant.messaging.codec import decode, envelope

# auto: tracing is simply off, and envelopes carry no trace context
state = ImmutantState.build({}, environ={})
assert state.settings["IMMUTANT_TRACING"] == "auto" and tracing_of(state) is None
assert decode(envelope("/queue/x", 1)).trace == {}
app = Flask("no_otel")
ImmutantExtension(app)
# on: refused at start-up, with the way out
try:
    strict = Flask("strict")
    strict.config["IMMUTANT_TRACING"] = "on"
    ImmutantExtension(strict)
except ImmutantConfigError as exc:
    print("refused:", exc)
'''

OFF_NEVER_IMPORTS = r'''
import sys
from flask import Flask
from flask_immutant import ImmutantExtension
from flask_immutant.messaging import messaging_for
app = Flask("off")
app.config.update(IMMUTANT_TRACING="off", IMMUTANT_HOME=sys.argv[1], IMMUTANT_CLUSTER=sys.argv[2])
ImmutantExtension(app)
messaging_for(app).publish("/queue/off", 1)
# redis-py 8 imports OpenTelemetry's SDK by itself when it is installed; ours is the spans module
print("imported:", sorted(m for m in sys.modules if m.startswith("flask_immutant.tracing.spans")))
'''


def test_without_the_extra_auto_is_off_and_on_is_refused():
    result = subprocess.run([sys.executable, "-c", WITHOUT_OTEL], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "refused: IMMUTANT_TRACING=on needs OpenTelemetry's API" in result.stdout
    assert "flask-immutant[otel]" in result.stdout


def test_tracing_off_never_loads_the_spans(node_env):
    result = subprocess.run([sys.executable, "-c", OFF_NEVER_IMPORTS, node_env["IMMUTANT_HOME"],
                             node_env["IMMUTANT_CLUSTER"]], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stdout
