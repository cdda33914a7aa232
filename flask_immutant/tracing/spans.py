"""The spans themselves: the one module that imports ``opentelemetry`` (its API only).

Names and attributes follow OpenTelemetry's messaging semantic conventions where they apply
(``publish``/``process`` spans, ``messaging.*`` attributes); the rest are ``immutant.*``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from importlib import metadata
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..messaging.codec import TRACEPARENT
from .base import Sent

if TYPE_CHECKING:
    from ..messaging.codec import Message

log = logging.getLogger("flask_immutant.tracing")

#: The kinds of failure already warned about in this process: each is logged once, then at DEBUG.
_warned: set[str] = set()


def _failed(what: str, exc: Exception) -> None:
    """An OpenTelemetry call (the app's SDK, processor, sampler or propagator) raised: tracing
    must never break a publish, a handler, a daemon or a job, so the caller goes on without it."""
    if what in _warned:
        log.debug("tracing: %s failed again (%s: %s)", what, type(exc).__name__, exc)
        return
    _warned.add(what)
    log.warning("tracing: %s failed (%s: %s); going on without it (logged once per process, then at DEBUG)",
                what, type(exc).__name__, exc)


def _version() -> str | None:
    try:
        return metadata.version("flask-immutant")
    except metadata.PackageNotFoundError:  # run from a source folder, not installed
        return None


#: From the global provider at each start, through the API's proxy: the app may set its provider
#: after importing us, as OpenTelemetry users do.
TRACER = trace.get_tracer("flask_immutant", _version())


class Current(Sent):
    """A started span made current for a ``with`` block, then ended: what the API's
    ``start_as_current_span`` does (an exception is recorded and sets status ERROR), in one frame
    instead of three, since every message passes through two of these. Every OpenTelemetry call
    in it is guarded: a failing processor or exporter costs the span, never the work."""

    __slots__ = ("_context", "_token", "span")

    def __init__(self, span: Span, parent: context.Context | None = None) -> None:
        super().__init__()
        self.span = span
        self._context = trace.set_span_in_context(span, parent)
        self._token: Any = None

    def __enter__(self) -> Current:
        try:
            self._token = context.attach(self._context)
        except Exception as exc:
            _failed("making a span current", exc)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._token is not None:
                context.detach(self._token)
        except Exception as exc:
            _failed("leaving a span's context", exc)
        try:
            if value is not None and isinstance(value, Exception) and self.span.is_recording():
                self.span.record_exception(value)
                self.span.set_status(Status(StatusCode.ERROR, f"{type(value).__name__}: {value}"))
        except Exception as exc:
            _failed("recording an exception on a span", exc)
        try:
            self.span.end()  # after a publish was sent: raising here would make its caller send it again
        except Exception as exc:
            _failed("ending a span", exc)

    def inject(self) -> None:
        """Write this span's context into :attr:`carrier` with the app's propagator (or, when that
        is OpenTelemetry's default and there is nothing but a traceparent to write, directly)."""
        try:
            span_context = self.span.get_span_context()
            if _w3c_default() and not span_context.trace_state and not baggage.get_all(self._context):
                self.carrier = {"traceparent": _traceparent(span_context)} if span_context.is_valid else {}
                return
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=self._context)
        except Exception as exc:  # the app's propagator: its failure must not stop the publish
            _failed("writing the trace context into a message", exc)
            carrier = {}
        self.carrier = carrier


def _traceparent(span_context: SpanContext) -> str:
    """W3C ``traceparent``, as OpenTelemetry's TraceContext propagator writes it."""
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"


#: The global propagator last seen, and whether it is OpenTelemetry's default (W3C trace context,
#: then W3C baggage): one identity check per message while the app does not change it.
_default_seen: list[Any] = [None, False]


def _w3c_default() -> bool:
    """True when the global propagator is OpenTelemetry's default: then a context with no
    tracestate and no baggage is exactly one ``traceparent``, which this module writes and reads
    without the propagators' generic machinery (a tenth of their CPU, per message, twice)."""
    textmap = propagate.get_global_textmap()
    if textmap is not _default_seen[0]:
        inner = getattr(textmap, "_propagators", None)
        default = (isinstance(textmap, CompositePropagator) and isinstance(inner, list)
                   and [type(p) for p in inner] == [TraceContextTextMapPropagator, W3CBaggagePropagator])
        _default_seen[:] = [textmap, default]
    return bool(_default_seen[1])


class Tracing:
    """Spans for one app in one process; ``node`` goes on every span."""

    def __init__(self, node: str) -> None:
        self.node = node

    def producing(self, destination: str, system: str, count: int, correlation_id: str | None = None) -> Current:
        """The PRODUCER span of one publish (``count`` messages); its carrier holds its context."""
        attributes: dict[str, Any] = {
            "messaging.system": system, "messaging.operation.type": "send", "messaging.operation.name": "publish",
            "messaging.destination.name": destination, "immutant.node": self.node,
        }
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        if correlation_id is not None:
            attributes["messaging.message.conversation_id"] = correlation_id
        current = _started(f"publish {destination}", SpanKind.PRODUCER, attributes, None)
        current.inject()
        return current

    def processing(self, message: Message, system: str, subscription: str | None) -> Current:
        """The CONSUMER span of one delivery, child of the publisher's span the message carries;
        ``subscription`` is the queue of a topic subscriber."""
        attributes: dict[str, Any] = {
            "messaging.system": system, "messaging.operation.type": "process", "messaging.operation.name": "process",
            "messaging.destination.name": message.destination, "messaging.message.id": message.id,
            "immutant.node": self.node,
        }
        if message.retries:  # a redelivery only: every attribute costs the SDK a check per span
            attributes["immutant.message.retries"] = message.retries
        if message.correlation_id is not None:
            attributes["messaging.message.conversation_id"] = message.correlation_id
        if subscription is not None:
            attributes["messaging.destination.subscription.name"] = subscription
        # The publisher's whole context becomes current (not only its span): baggage comes along.
        parent = _extracted(message.trace) if message.trace else None
        return _started(f"process {message.destination}", SpanKind.CONSUMER, attributes, parent)

    def daemon_run(self, name: str, singleton: bool, fence: int | None) -> Current:
        attributes: dict[str, Any] = {"immutant.daemon.name": name, "immutant.daemon.singleton": singleton,
                                      "immutant.node": self.node}
        if fence is not None:
            attributes["immutant.daemon.fencing_token"] = fence
        return _started(f"daemon {name}", SpanKind.INTERNAL, attributes, context.Context())

    def job_fire(self, name: str, due: float, singleton: bool) -> Current:
        attributes: dict[str, Any] = {"immutant.job.name": name, "immutant.job.due": due,
                                      "immutant.job.lateness_s": round(max(0.0, time.time() - due), 6),
                                      "immutant.job.singleton": singleton, "immutant.node": self.node}
        return _started(f"job {name}", SpanKind.INTERNAL, attributes, context.Context())


def _started(name: str, kind: SpanKind, attributes: dict[str, Any], parent: context.Context | None) -> Current:
    """A started span under ``parent`` (the thread's context when ``None``; an empty one starts a
    trace of its own). When the SDK fails to start it, a non-recording span that carries the
    parent's context stands in: the trace still travels, the work goes on."""
    try:
        return Current(TRACER.start_span(name, context=parent, kind=kind, attributes=attributes), parent)
    except Exception as exc:
        _failed("starting a span", exc)
    try:
        return Current(NonRecordingSpan(trace.get_current_span(parent).get_span_context()), parent)
    except Exception as exc:  # not even the API's own context: a span that is nothing
        _failed("reading the parent span's context", exc)
        return Current(INVALID_SPAN, context.Context())


#: OpenTelemetry's own loggers a propagator writes to while it reads a message's context.
PROPAGATOR_LOGGERS = ("opentelemetry.baggage.propagation", "opentelemetry.trace.propagation.tracecontext",
                      "opentelemetry.trace.span", "opentelemetry.propagators.composite",
                      "opentelemetry.propagate")


class _Held(logging.Filter):
    """While this thread reads a message's trace context, the propagators' records are held
    instead of written: a crafted message may hold up to 180 malformed baggage members, one
    warning each, with the sender's text (newlines included) in every one."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held: list[logging.LogRecord] | None = getattr(self.local, "held", None)
        if held is None:
            return True
        held.append(record)
        return False


_HELD = _Held()
for _name in PROPAGATOR_LOGGERS:
    logging.getLogger(_name).addFilter(_HELD)


def _extracted(carrier: Mapping[str, str]) -> context.Context:
    """The context a message carries; one the app's propagator cannot read starts a new trace.
    What the propagators say about one message becomes at most one line, its text escaped."""
    held: list[logging.LogRecord] = []
    _HELD.local.held = held
    try:
        if len(carrier) == 1 and "traceparent" in carrier and _w3c_default():
            return _from_traceparent(carrier["traceparent"])
        return propagate.extract(carrier)
    except Exception as exc:
        _failed("reading the trace context of a message", exc)
        return context.Context()
    finally:
        _HELD.local.held = None
        if held:
            _malformed(held)


def _from_traceparent(header: str) -> context.Context:
    """What the default propagator reads from a lone ``traceparent`` (a version-00 header is
    exactly this format; a longer one of a later version is not read, as the codec drops it)."""
    if not TRACEPARENT.fullmatch(header):
        return context.Context()
    version, trace_id, span_id, flags = header.split("-")
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return context.Context()
    remote = SpanContext(trace_id=int(trace_id, 16), span_id=int(span_id, 16), is_remote=True,
                         trace_flags=TraceFlags(int(flags, 16)))
    return trace.set_span_in_context(NonRecordingSpan(remote), context.Context())


def _malformed(held: list[logging.LogRecord]) -> None:
    try:
        first = held[0].getMessage()
    except Exception:  # a record whose arguments do not format
        first = str(held[0].msg)
    text = f"{len(held)} warning(s) from the propagator, the first: {first[:200]!r}"
    if "malformed trace context" in _warned:
        log.debug("tracing: a message's trace context is malformed: %s", text)
        return
    _warned.add("malformed trace context")
    log.warning("tracing: a message's trace context is malformed, what it could not read is dropped: %s "
                "(logged once per process, then at DEBUG)", text)
