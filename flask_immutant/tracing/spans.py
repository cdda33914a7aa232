"""The spans themselves: the one module that imports ``opentelemetry`` (its API only).

Names and attributes follow OpenTelemetry's messaging semantic conventions where they apply
(``publish``/``process`` spans, ``messaging.*`` attributes); the rest are ``immutant.*``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind

from .. import __version__
from . import Sent

if TYPE_CHECKING:
    from ..messaging.codec import Message

log = logging.getLogger("flask_immutant.tracing")

#: From the global provider at each start, through the API's proxy: the app may set its provider
#: after importing us, as OpenTelemetry users do.
TRACER = trace.get_tracer("flask_immutant", __version__)


class _Sent(Sent):
    def __init__(self, span: Span, carrier: dict[str, str]) -> None:
        self.span = span
        self.carrier = carrier

    def sent(self, ids: list[str | None]) -> None:
        if len(ids) == 1 and ids[0] is not None:
            self.span.set_attribute("messaging.message.id", ids[0])


class Tracing:
    """Spans for one app in one process; ``node`` goes on every span."""

    def __init__(self, node: str) -> None:
        self.node = node

    @contextmanager
    def producing(self, destination: str, system: str, count: int,
                  correlation_id: str | None = None) -> Iterator[Sent]:
        """The PRODUCER span of one publish (``count`` messages); the carrier holds its context."""
        attributes: dict[str, Any] = {
            "messaging.system": system, "messaging.operation.type": "send", "messaging.operation.name": "publish",
            "messaging.destination.name": destination, "immutant.node": self.node,
        }
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        if correlation_id is not None:
            attributes["messaging.message.conversation_id"] = correlation_id
        with TRACER.start_as_current_span(f"publish {destination}", kind=SpanKind.PRODUCER,
                                          attributes=attributes) as span:
            carrier: dict[str, str] = {}
            try:
                propagate.inject(carrier)
            except Exception as exc:  # the app's propagator: its failure must not stop the publish
                log.warning("the trace context could not be written into the message (%s)", exc)
            yield _Sent(span, carrier)

    @contextmanager
    def processing(self, message: Message, system: str, subscription: str | None) -> Iterator[None]:
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
        # Attached (not only passed as the parent) so the publisher's baggage comes along too.
        token = context.attach(_extracted(message.trace)) if message.trace else None
        try:
            with TRACER.start_as_current_span(f"process {message.destination}", kind=SpanKind.CONSUMER,
                                              attributes=attributes):
                yield
        finally:
            if token is not None:
                context.detach(token)

    @contextmanager
    def daemon_run(self, name: str, singleton: bool, fence: int | None) -> Iterator[None]:
        attributes: dict[str, Any] = {"immutant.daemon.name": name, "immutant.daemon.singleton": singleton,
                                      "immutant.node": self.node}
        if fence is not None:
            attributes["immutant.daemon.fencing_token"] = fence
        with TRACER.start_as_current_span(f"daemon {name}", kind=SpanKind.INTERNAL, attributes=attributes,
                                          context=context.Context()):
            yield

    @contextmanager
    def job_fire(self, name: str, due: float, singleton: bool) -> Iterator[None]:
        attributes: dict[str, Any] = {"immutant.job.name": name, "immutant.job.due": due,
                                      "immutant.job.lateness_s": round(max(0.0, time.time() - due), 6),
                                      "immutant.job.singleton": singleton, "immutant.node": self.node}
        with TRACER.start_as_current_span(f"job {name}", kind=SpanKind.INTERNAL, attributes=attributes,
                                          context=context.Context()):
            yield


def _extracted(carrier: Mapping[str, str]) -> context.Context:
    """The context a message carries; one the app's propagator cannot read starts a new trace."""
    try:
        return propagate.extract(carrier)
    except Exception as exc:
        log.debug("the trace context of a message could not be read (%s); it starts a new trace", exc)
        return context.Context()


def current_ids() -> Mapping[str, str] | None:
    """``trace_id`` and ``span_id`` (hex) of the span active on this thread, if any (for logs)."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return {"trace_id": format(span_context.trace_id, "032x"), "span_id": format(span_context.span_id, "016x")}
