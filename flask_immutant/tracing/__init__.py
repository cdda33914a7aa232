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
from typing import TYPE_CHECKING, Any, NamedTuple

from ..protocols import Slot
from .base import NO_SPAN, Sent
from .config import SETTING

if TYPE_CHECKING:
    from flask import Flask

    from ..protocols import StateView
    from .spans import Tracing

__all__ = ["NO_SPAN", "SETTING", "Sent", "daemon_span", "job_span", "tracing_of"]

log = logging.getLogger("flask_immutant.tracing")


class _Decided(NamedTuple):
    """Whether this app traces, decided once: ``tracing`` is ``None`` when it does not. A named
    tuple: a frozen dataclass's creation costs every command (which loads the plugin) 0.4 ms."""

    tracing: Tracing | None


#: Where an app's decision (and its :class:`~.spans.Tracing`) is kept in its state.
TRACING: Slot[_Decided] = Slot("tracing")


def tracing_of(state: StateView) -> Tracing | None:
    """The app's tracing, or ``None`` when IMMUTANT_TRACING is off or the API is not installed."""
    decided = state.get(TRACING)
    if decided is None:
        decided = state.put(TRACING, _Decided(_make(state)))
    return decided.tracing


def _make(state: StateView) -> Tracing | None:
    if state.settings.get(SETTING, "off") == "off":
        return None
    try:
        from .spans import Tracing
    except ImportError as exc:  # "auto" without the extra (plugin.py refuses "on" at init_app)
        log.debug("tracing is off: OpenTelemetry's API cannot be imported (%s)", exc)
        return None
    return Tracing(state.node_name)


def _tracing_of_app(app: Flask) -> Tracing | None:
    from ..state import EXTENSION_KEY

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
