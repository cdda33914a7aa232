"""Messaging: load-balanced queues, topics (durable too) and request/respond, on Dramatiq.

    from flask_immutant import messaging

    immutant = ImmutantExtension()

    @immutant.listen("/queue/msg")              # at import time, before any app exists
    def received(n): print("received:", n)

    immutant.publish("/queue/msg", 42)          # wherever current_app is set

The functions here are the second way: each acts on the app given as ``app=`` or, by default, on
``flask.current_app``; the declaring ones (``declare``, ``listen``, ``respond``) without either act
on the app initialised last, or are kept for the next app initialised. Delivery is at least once;
see docs/messaging.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ImmutantConfigError
from ..moved import lazy_or_moved
from ..state import FEATURE_FLAGS
from ..state import declare as _declare
from .errors import EncodeError, MalformedMessage, MessagingError, RemoteError, RequestTimeout

if TYPE_CHECKING:
    from flask import Flask

    from .codec import Message
    from .core import Handler, Listener, Messaging, Response
    from .destination import Destination
    from .engine import current_message
    from .selector import Selector

#: Public names imported on first use, so that loading the plugin (every CLI command does) never
#: loads Dramatiq.
_LAZY = {"Message": ".codec", "Handler": ".core", "Listener": ".core", "Response": ".core",
         "Destination": ".destination", "current_message": ".engine", "Selector": ".selector"}
#: Internals that were public before issue 12: importable here still, with a DeprecationWarning.
MOVED = {"Messaging": "flask_immutant.messaging.core.Messaging"}


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, MOVED)


class MessagingSwitchedOff(ImmutantConfigError, MessagingError):
    """Messaging used while ``IMMUTANT_MESSAGING`` is off (a ``MessagingError`` too, as before)."""


def messaging_for(app: Flask | None = None) -> Messaging:
    """The per-app messaging object of ``app`` (default: the current app); internal: the functions
    here are the public way."""
    from ..state import get_state, switched_off
    from .plugin import messaging_of

    state = get_state(app)
    if not state.pm.has_plugin(FEATURE_FLAGS["messaging"][0]):
        raise MessagingSwitchedOff(str(switched_off("messaging")))
    return messaging_of(state)


def declare(name: str, *, app: Flask | None = None, kind: str | None = None, **options: Any) -> Destination | None:
    """Declare a destination: ``/queue/...`` or ``/topic/...``, or any name with ``kind=``.
    Returns it, or ``None`` when kept for the next app initialised."""
    return _declare(app, lambda target: messaging_for(target).start(name, kind=kind, **options))


#: The name before the one vocabulary (``start`` now means nothing else anywhere): still works.
start = declare


def current() -> Any:
    """What this thread is running for (``flask_immutant.current()``): inside a listener, the
    :class:`Message`; ``current_message()`` is its messaging-only alias."""
    from ..running import current as _current

    return _current()


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


def publish_many(
    name: str,
    messages: Iterable[Any],
    *,
    app: Flask | None = None,
    keys: Iterable[str | None] | None = None,
    priority: int | None = None,
    ttl: float | None = None,
    delay: float | None = None,
    properties: Mapping[str, Any] | None = None,
    encoding: str = "json",
) -> list[str | None]:
    """Publish several messages to one queue or topic in one round trip to the broker; returns
    their ids in order (``None``: dropped as a duplicate of its key in ``keys``)."""
    return messaging_for(app).publish_many(
        name, messages, keys=keys, priority=priority, ttl=ttl, delay=delay, properties=properties,
        encoding=encoding,
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
    """Call ``handler(message)`` in the app context for messages on ``name`` (declared if it is
    not); returns a :class:`Listener` (``.stop()``), or a decorator when ``handler`` is omitted."""
    if handler is None:
        def decorator(fn: Handler) -> Any:
            listener = listen(name, fn, app=app, concurrency=concurrency, selector=selector,
                              durable_name=durable_name)
            return fn if listener is None else listener

        return decorator
    return _declare(app, lambda target: messaging_for(target).listen(
        name, handler, concurrency=concurrency, selector=selector, durable_name=durable_name))


def request(name: str, message: Any, *, app: Flask | None = None, timeout: float | None = 30.0,
            **options: Any) -> Response:
    """Publish a request; ``.result()`` on the returned :class:`Response` waits for the answer."""
    return messaging_for(app).request(name, message, timeout=timeout, **options)


def respond(name: str, fn: Handler | None = None, *, app: Flask | None = None, **options: Any) -> Any:
    """Answer requests on ``name`` with ``fn(message)``; a decorator when ``fn`` is omitted."""
    if fn is None:
        def decorator(function: Handler) -> Any:
            answered = respond(name, function, app=app, **options)
            return function if answered is None else answered

        return decorator
    return _declare(app, lambda target: messaging_for(target).respond(name, fn, **options))


__all__ = [
    "Destination",
    "EncodeError",
    "Listener",
    "MalformedMessage",
    "Message",
    "MessagingError",
    "RemoteError",
    "RequestTimeout",
    "Response",
    "current",
    "current_message",
    "declare",
    "listen",
    "publish",
    "publish_many",
    "request",
    "respond",
    "start",
    "stop",
]
