"""Messaging: load-balanced queues, topics (durable too) and request/respond, on Dramatiq.

    from flask_immutant import messaging

    messaging.listen("/queue/msg", lambda n: print("received:", n), app=app)   # at import time
    messaging.publish("/queue/msg", 42)                                          # anywhere

Every function acts on the app given as ``app=`` or, by default, on ``flask.current_app``.
Delivery is at least once; see docs/messaging.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .codec import Message
from .core import Handler, Listener, Messaging, Response
from .destination import Destination
from .engine import current_message
from .errors import EncodeError, MalformedMessage, MessagingError, RemoteError, RequestTimeout
from .selector import Selector

if TYPE_CHECKING:
    from flask import Flask


def messaging_for(app: Flask | None = None) -> Messaging:
    """The :class:`Messaging` of ``app`` (default: the current app)."""
    from ..extension import get_state
    from .plugin import messaging_of

    state = get_state(app)
    if not state.pm.has_plugin("flask_immutant.messaging.plugin"):
        raise MessagingError("messaging is switched off for this app (IMMUTANT_MESSAGING=False)")
    return messaging_of(state)


def start(name: str, *, app: Flask | None = None, kind: str | None = None, **options: Any) -> Destination:
    """Declare a destination: ``/queue/...`` or ``/topic/...``, or any name with ``kind=``."""
    return messaging_for(app).start(name, kind=kind, **options)


def stop(name: str, *, app: Flask | None = None) -> None:
    """Stop this app's listeners on ``name``."""
    messaging_for(app).stop(name)


def publish(
    name: str,
    message: Any,
    *,
    app: Flask | None = None,
    priority: int | None = None,
    ttl: float | None = None,
    delay: float | None = None,
    properties: Mapping[str, Any] | None = None,
    correlation_id: str | None = None,
    encoding: str = "json",
    key: str | None = None,
) -> str | None:
    """Publish ``message`` to a queue or topic; returns its id (``None``: dropped as a duplicate
    of ``key``). Raises :class:`EncodeError` if it cannot be encoded."""
    return messaging_for(app).publish(
        name, message, priority=priority, ttl=ttl, delay=delay, properties=properties,
        correlation_id=correlation_id, encoding=encoding, key=key,
    )


def listen(
    name: str,
    handler: Handler | None = None,
    *,
    app: Flask | None = None,
    concurrency: int | None = None,
    selector: str | Selector | None = None,
    durable_name: str | None = None,
) -> Any:
    """Call ``handler(message)`` in the app context for messages on ``name``; returns a
    :class:`Listener` (``.stop()``), or a decorator when ``handler`` is omitted."""
    return messaging_for(app).listen(name, handler, concurrency=concurrency, selector=selector,
                                     durable_name=durable_name)


def request(name: str, message: Any, *, app: Flask | None = None, timeout: float | None = 30.0,
            **options: Any) -> Response:
    """Publish a request; ``.result()`` on the returned :class:`Response` waits for the answer."""
    return messaging_for(app).request(name, message, timeout=timeout, **options)


def respond(name: str, fn: Handler | None = None, *, app: Flask | None = None, **options: Any) -> Any:
    """Answer requests on ``name`` with ``fn(message)``; a decorator when ``fn`` is omitted."""
    return messaging_for(app).respond(name, fn, **options)


__all__ = [
    "Destination",
    "EncodeError",
    "Listener",
    "MalformedMessage",
    "Message",
    "Messaging",
    "MessagingError",
    "RemoteError",
    "RequestTimeout",
    "Response",
    "current_message",
    "listen",
    "messaging_for",
    "publish",
    "request",
    "respond",
    "start",
    "stop",
]
