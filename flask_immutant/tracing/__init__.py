"""Traces across the cluster with OpenTelemetry (the ``otel`` extra).

Publishing a message opens a PRODUCER span and carries its W3C context (``traceparent``,
``tracestate``, baggage: whatever the global propagator writes) inside the message; the node that
handles it runs the handler in a CONSUMER span that is the producer's child. Each run of a daemon
and each job fire get a span too. Only the global OpenTelemetry API is used: the app configures
its TracerProvider and exporter, as with any instrumentation library (docs/tracing.md).

Nothing imports ``opentelemetry`` unless ``IMMUTANT_TRACING`` allows it and a span is needed:
:mod:`.spans` is the one module that does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import FEATURE, SETTING

if TYPE_CHECKING:
    from flask import Flask

    from ..extension import ImmutantState
    from .spans import Tracing

__all__ = ["NO_SPAN", "SETTING", "Sent", "daemon_span", "job_span", "tracing_of"]

log = logging.getLogger("flask_immutant.tracing")


class Sent:
    """The span of a publish, as the publisher sees it: the carrier to put in each message."""

    __slots__ = ("carrier",)

    def __init__(self) -> None:
        self.carrier: Mapping[str, str] | None = None


#: The span of a publish, a delivery, a daemon run or a job fire when tracing is off.
NO_SPAN: contextlib.nullcontext[Sent] = contextlib.nullcontext(Sent())


def tracing_of(state: ImmutantState) -> Tracing | None:
    """The app's tracing, or ``None`` when IMMUTANT_TRACING is off or the API is not installed."""
    try:
        return state.features[FEATURE]  # type: ignore[no-any-return]
    except KeyError:
        pass
    found: Tracing | None = None
    if state.settings.get(SETTING, "off") != "off":
        try:
            from .spans import Tracing
        except ImportError as exc:  # "auto" without the extra (plugin.py refuses "on" at init_app)
            log.debug("tracing is off: OpenTelemetry's API cannot be imported (%s)", exc)
        else:
            found = Tracing(state.node_name)
    state.features[FEATURE] = found
    return found


def _tracing_of_app(app: Flask) -> Tracing | None:
    from ..extension import EXTENSION_KEY

    state = app.extensions.get(EXTENSION_KEY)
    return None if state is None else tracing_of(state)


def daemon_span(app: Flask, name: str, singleton: bool, fence: int | None) -> contextlib.AbstractContextManager[Any]:
    """The span of one run of a daemon's start function (a singleton's carries its fencing token)."""
    tracing = _tracing_of_app(app)
    return NO_SPAN if tracing is None else tracing.daemon_run(name, singleton, fence)


def job_span(app: Flask, name: str, due: float, singleton: bool) -> contextlib.AbstractContextManager[Any]:
    """The span of one fire of a scheduled job."""
    tracing = _tracing_of_app(app)
    return NO_SPAN if tracing is None else tracing.job_fire(name, due, singleton)
