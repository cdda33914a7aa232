"""The spans themselves: the one module that imports ``opentelemetry`` (its API only).

Names and attributes follow OpenTelemetry's messaging semantic conventions where they apply
(``publish``/``process`` spans, ``messaging.*`` attributes); the rest are ``immutant.*``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from importlib import metadata
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .base import Sent

if TYPE_CHECKING:
    from ..messaging.codec import Message

log = logging.getLogger("flask_immutant.tracing")



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
    instead of three, since every message passes through two of these."""

    __slots__ = ("_context", "_token", "span")

    def __init__(self, span: Span, parent: context.Context | None = None) -> None:
        super().__init__()
        self.span = span
        self._context = trace.set_span_in_context(span, parent)
        self._token: Any = None

    def __enter__(self) -> Current:
        self._token = context.attach(self._context)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        context.detach(self._token)
        if value is not None and isinstance(value, Exception) and self.span.is_recording():
            self.span.record_exception(value)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(value).__name__}: {value}"))
        self.span.end()

    def inject(self) -> None:
        """Write this span's context into :attr:`carrier` with the app's propagator."""
        carrier: dict[str, str] = {}
        try:
            propagate.inject(carrier, context=self._context)
        except Exception as exc:  # the app's propagator: its failure must not stop the publish
            log.warning("the trace context could not be written into the message (%s)", exc)
        self.carrier = carrier


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
        current = Current(TRACER.start_span(f"publish {destination}", kind=SpanKind.PRODUCER, attributes=attributes))
        current.inject()
        return current

    def processing(self, message: Message, system: str, subscription: str | None) -> Current:
        """The CONSUMER span of one delivery, child of the publisher's span the message carries;
        ``subscription`` is the queue of a topic subscriber."""
        attributes: dict[str, Any] = {
            "messaging.system": system, "messaging.operation.type": "process", "messaging.operation.name": "process",
            "messaging.destination.name": message.destination, "messaging.message.id": message.id,
            "immutant.node": self.node, "immutant.message.retries": message.retries,
        }
        if message.correlation_id is not None:
            attributes["messaging.message.conversation_id"] = message.correlation_id
        if subscription is not None:
            attributes["messaging.destination.subscription.name"] = subscription
        # The publisher's whole context becomes current (not only its span): baggage comes along.
        parent = _extracted(message.trace) if message.trace else None
        span = TRACER.start_span(f"process {message.destination}", context=parent, kind=SpanKind.CONSUMER,
                                 attributes=attributes)
        return Current(span, parent)

    def daemon_run(self, name: str, singleton: bool, fence: int | None) -> Current:
        attributes: dict[str, Any] = {"immutant.daemon.name": name, "immutant.daemon.singleton": singleton,
                                      "immutant.node": self.node}
        if fence is not None:
            attributes["immutant.daemon.fencing_token"] = fence
        return _root(f"daemon {name}", attributes)

    def job_fire(self, name: str, due: float, singleton: bool) -> Current:
        attributes: dict[str, Any] = {"immutant.job.name": name, "immutant.job.due": due,
                                      "immutant.job.lateness_s": round(max(0.0, time.time() - due), 6),
                                      "immutant.job.singleton": singleton, "immutant.node": self.node}
        return _root(f"job {name}", attributes)


def _root(name: str, attributes: dict[str, Any]) -> Current:
    """A span that starts a trace of its own (whatever the thread's context holds)."""
    empty = context.Context()
    return Current(TRACER.start_span(name, context=empty, kind=SpanKind.INTERNAL, attributes=attributes), empty)


def _extracted(carrier: Mapping[str, str]) -> context.Context:
    """The context a message carries; one the app's propagator cannot read starts a new trace."""
    try:
        return propagate.extract(carrier)
    except Exception as exc:
        log.debug("the trace context of a message could not be read (%s); it starts a new trace", exc)
        return context.Context()
