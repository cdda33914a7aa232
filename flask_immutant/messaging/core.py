"""The messaging API of one app: destinations, publish, listen, request/respond.

Kept in the app state's ``MESSAGING`` slot. Calls made where the app is only imported (module level
of ``app.py`` in the node supervisor, a CLI command, the app runtime before it starts) register
listeners; the app runtime starts consuming in ``immutant_runtime_started``. Calls made once the
runtime is running (``state.runtime`` set) take effect at once. Publishing works anywhere.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast, overload

from dramatiq import Message as DramatiqMessage
from dramatiq.broker import Broker

from ..metrics import definitions as metrics
from ..once import computed_once
from ..protocols import Slot
from ..records import from_json, hash_of, json_object, read_records
from ..tracing import NO_SPAN, Sent, tracing_of
from .backends import Backend, Target, make_backend
from .codec import Message, envelope, new_id
from .destination import Destination, actor_name
from .engine import Engine, current_message
from .errors import EncodeError, MessagingError, RemoteError, RequestTimeout
from .selector import Selector, compile_selector

if TYPE_CHECKING:
    from ..protocols import RuntimeView
    from ..state import ImmutantState
    from ..tracing.spans import Tracing

log = logging.getLogger("flask_immutant.messaging")


#: Seconds of the runtime's stop the engine leaves for what follows its handlers (the consumers'
#: last poll, the leave that puts unacked messages back), at most half of what is left.
ENGINE_EXIT_MARGIN = 1.0


def stop_budget(runtime: RuntimeView) -> float:
    """How long the engine may let handlers finish: until the runtime's stop deadline less
    :data:`ENGINE_EXIT_MARGIN`, so its leave happens before the runtime exits (cut, the held
    messages would wait for another node's reaper, a failure timeout)."""
    deadline = getattr(runtime, "stop_deadline", None)
    left = float(runtime.settings["IMMUTANT_SHUTDOWN_TIMEOUT"] if deadline is None else deadline - time.monotonic())
    return max(0.0, left - min(ENGINE_EXIT_MARGIN, left / 2))
#: Where an app's :class:`Messaging` is kept in its state.
MESSAGING: Slot[Messaging] = Slot("messaging")

Handler = Callable[[Any], Any]
#: Messages per broker call of ``publish_many`` (a bigger batch is sent in several round trips, so
#: one script never holds the store for long).
PUBLISH_BATCH = 500
_numbers = itertools.count(1)


class Listener:
    """A handler listening on a destination; ``stop()`` ends it. Calling it calls the handler, so
    ``@listen(...)`` used as a decorator leaves the function usable."""

    def __init__(
        self,
        messaging: Messaging,
        destination: Destination,
        handler: Handler,
        *,
        concurrency: int | None = None,
        selector: str | Selector | None = None,
        durable_name: str | None = None,
    ) -> None:
        if not callable(handler):
            raise MessagingError(f"a listener's handler must be callable, not {handler!r}")
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                        or concurrency < 1):
            raise MessagingError(f"concurrency={concurrency!r} is not allowed: expected an integer >= 1")
        if durable_name is not None and destination.kind != "topic":
            raise MessagingError(f"durable_name is for topics; {destination.name} is a queue")
        self.messaging = messaging
        self.destination = destination
        self.handler = handler
        self.concurrency = concurrency
        self.selector = compile_selector(selector)
        self.durable_name = durable_name
        self.number = next(_numbers)
        #: The Dramatiq queue this listener consumes, once bound in the runtime.
        self.queue: str | None = None
        self.stopped = False
        self._slots = threading.BoundedSemaphore(concurrency) if concurrency else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.handler(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Listener {self.destination.name} {getattr(self.handler, '__name__', self.handler)!r}>"

    def accepts(self, properties: Mapping[str, Any]) -> bool:
        return self.selector is None or bool(self.selector(properties))

    def handle(self, message: Message) -> Any:
        if self._slots is None:
            return self.handler(message.body)
        with self._slots:
            return self.handler(message.body)

    def stop(self) -> None:
        """Stop listening (idempotent). A non-durable topic subscription is removed with it."""
        self.messaging.unlisten(self)


class Response:
    """The future-like result of :meth:`Messaging.request`."""

    def __init__(self, messaging: Messaging, destination: str, correlation_id: str, timeout: float | None) -> None:
        self._messaging = messaging
        self.destination = destination
        self.correlation_id = correlation_id
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._outcome: tuple[bool, Any] | None = None

    def done(self) -> bool:
        if self._outcome is None:
            raw = self._messaging.state.store.lpop(self._messaging.state.keys.messaging_reply(self.correlation_id))
            if raw is not None:
                self._outcome = _reply(cast(bytes, raw))  # LPOP without a count: one bulk reply
        return self._outcome is not None

    def result(self, timeout: float | None = None) -> Any:
        """The responder's return value; raises :class:`RequestTimeout` or :class:`RemoteError`."""
        if self._outcome is None:
            if timeout is None and self._deadline is not None:
                timeout = max(0.0, self._deadline - time.monotonic())
            store = self._messaging.state.store
            key = self._messaging.state.keys.messaging_reply(self.correlation_id)
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._outcome is None:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    raise RequestTimeout(f"no response from {self.destination} within {timeout:g}s")
                popped = store.blpop([key], timeout=max(wait, 0.01))
                if popped is not None:
                    self._outcome = _reply(popped[1])
        ok, value = self._outcome
        if not ok:
            raise RemoteError(f"the responder on {self.destination} raised {value}")
        return value


def _reply(raw: bytes | str) -> tuple[bool, Any]:
    """(ok, value or error) of a reply; one that is not ours is an error, never an exception here."""
    try:
        data = from_json(raw)
    except ValueError as exc:
        return False, f"a malformed reply ({exc})"
    if not isinstance(data, dict) or (data.get("ok") and "value" not in data):
        return False, f"a malformed reply: {str(data)[:200]!r}"
    return (True, data["value"]) if data.get("ok") else (False, data.get("error"))


def messaging_of(state: ImmutantState) -> Messaging:
    """The app's messaging, made on first use."""
    return state.feature(MESSAGING, Messaging)


class Messaging:
    """Messaging for one app (in its state's ``MESSAGING`` slot)."""

    def __init__(self, state: ImmutantState) -> None:
        self.state = state
        self.destinations: dict[str, Destination] = {}
        self.listeners: list[Listener] = []
        self.engine: Engine | None = None
        self._registered: set[str] = set()
        self._lock = threading.RLock()
        self._publisher_local = threading.local()

    # --- backend and publishing broker ---

    @computed_once
    def backend(self) -> Backend:
        return make_backend(self.state.store, self.state.keys, self.state.settings["IMMUTANT_BROKER_URL"])

    @computed_once
    def tracing(self) -> Tracing | None:
        return tracing_of(self.state)

    @computed_once
    def publisher(self) -> Broker:
        """A broker for publishing only: no worker is attached, so it never consumes."""
        return self.backend.make_broker([])

    # --- destinations ---

    def start(self, name: str, *, kind: str | None = None, **options: Any) -> Destination:
        """Declare a destination (idempotent). ``/queue/...`` and ``/topic/...`` names say their
        kind; other names need ``kind=``."""
        if options:
            raise MessagingError(f"unknown option(s) for start(): {', '.join(sorted(options))}")
        with self._lock:
            destination = self.destinations.get(name)
            if destination is None:
                destination = Destination.parse(name, self.state.keys.cluster, kind)
                self.destinations[name] = destination
            elif kind is not None and destination.kind != kind:
                raise MessagingError(f"{name} was started as a {destination.kind}, not a {kind}")
        if self.state.runtime is not None:
            self._register(destination)
        return destination

    def stop(self, name: str) -> None:
        """Stop every local listener on ``name`` and forget it here (its messages are kept)."""
        for listener in [lst for lst in self.listeners if lst.destination.name == name]:
            listener.stop()
        with self._lock:
            self.destinations.pop(name, None)

    def _destination(self, name: str | Destination) -> Destination:
        if isinstance(name, Destination):
            return name
        destination = self.destinations.get(name)
        return destination if destination is not None else self.start(name)

    def _register(self, destination: Destination) -> None:
        """Make the destination known cluster-wide (for ``flask immutant queues`` and status)."""
        if destination.name in self._registered:
            return
        record = {"kind": destination.kind,
                  "queue": destination.queue_name if destination.kind == "queue" else None}
        self.state.store.hset(self.state.keys.messaging_destinations, destination.name, json.dumps(record))
        self._registered.add(destination.name)

    def known_topics(self) -> list[str]:
        found = read_records(hash_of(self.state.store, self.state.keys.messaging_destinations, "destination"),
                             "destination", json_object)
        return [name for name, record in found.items() if record.get("kind") == "topic"]

    # --- publishing ---

    def publish(
        self,
        name: str,
        message: Any,
        *,
        priority: int | None = None,
        ttl: float | None = None,
        delay: float | None = None,
        properties: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        encoding: str = "json",
        key: str | None = None,
        reply_to: str | None = None,
    ) -> str | None:
        """Publish ``message``; returns its id, or ``None`` if ``key`` marked it a duplicate.

        ``delay`` and ``ttl`` are seconds; ``priority`` 0..9 (4 normal; above 4 goes ahead of the
        queue on Redis, and is RabbitMQ's message priority there). When this returns, the broker
        has the message (acknowledged to the publisher).
        """
        destination = self._destination(name)
        with self._producing(destination, 1, correlation_id) as span:
            outgoing = self._outgoing(destination, [(message, key)], priority=priority, ttl=ttl, delay=delay,
                                      properties=properties, correlation_id=correlation_id, encoding=encoding,
                                      reply_to=reply_to, trace=span.carrier)
            return self._send(destination, outgoing)[0]

    def publish_many(
        self,
        name: str,
        messages: Iterable[Any],
        *,
        keys: Iterable[str | None] | None = None,
        priority: int | None = None,
        ttl: float | None = None,
        delay: float | None = None,
        properties: Mapping[str, Any] | None = None,
        encoding: str = "json",
    ) -> list[str | None]:
        """Publish each of ``messages`` to one destination, with the same options, in one round trip
        to the broker; returns their ids in order (``None``: dropped as a duplicate of its key).

        ``keys``, when given, holds one idempotency key (or ``None``) per message. On the Redis
        broker the batch is written whole and in the order given; on RabbitMQ in one transaction.
        """
        destination = self._destination(name)
        bodies = list(messages)
        key_list = [None] * len(bodies) if keys is None else list(keys)
        if len(key_list) != len(bodies):
            raise MessagingError(f"publish_many got {len(bodies)} messages but {len(key_list)} keys: "
                                 "expected one key (or None) per message")
        ids: list[str | None] = []
        with self._producing(destination, len(bodies)) as span:
            outgoing = self._outgoing(destination, list(zip(bodies, key_list, strict=True)), priority=priority,
                                      ttl=ttl, delay=delay, properties=properties, encoding=encoding,
                                      trace=span.carrier)
            for start in range(0, len(outgoing), PUBLISH_BATCH):
                ids += self._send(destination, outgoing[start:start + PUBLISH_BATCH])
        return ids

    def _producing(self, destination: Destination, count: int,
                   correlation_id: str | None = None) -> contextlib.AbstractContextManager[Sent]:
        """The span of one publish (its context travels in every message), or none."""
        tracing = self.tracing
        if tracing is None:
            return NO_SPAN
        return tracing.producing(destination.name, self.backend.kind, count, correlation_id)

    def _outgoing(
        self,
        destination: Destination,
        messages: list[tuple[Any, str | None]],
        *,
        priority: int | None,
        ttl: float | None,
        delay: float | None,
        properties: Mapping[str, Any] | None,
        encoding: str,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> list[tuple[str, str | None, list[Target], tuple[str, int] | None]]:
        """Each message checked and encoded: (id, key, one target per queue, idempotency marker)."""
        self._register(destination)
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                     or not 0 <= priority <= 9):
            raise MessagingError(f"priority={priority!r} is not allowed: expected an integer from 0 to 9")
        if delay is not None and delay < 0:
            raise MessagingError(f"delay={delay!r} is not allowed: expected seconds >= 0")
        if destination.kind == "queue":
            actors = destination.queue_actors
        else:
            subscriptions = self.state.store.hkeys(self.state.keys.messaging_subscriptions(destination.name))
            queues = [q.decode() if isinstance(q, bytes) else q for q in subscriptions]
            actors = tuple((queue, actor_name(queue)) for queue in queues)
        delay_ms = None if delay is None else int(delay * 1000)
        outgoing = []
        for message, key in messages:
            data = envelope(destination.name, message, encoding=encoding, properties=properties,
                            correlation_id=correlation_id, reply_to=reply_to, key=key, ttl=ttl, trace=trace)
            message_id = new_id()
            targets = [
                Target(DramatiqMessage(queue_name=queue, actor_name=actor, args=(data,), kwargs={},
                                       options={}, message_id=message_id), delay_ms, priority)
                for queue, actor in actors
            ]
            dedupe = None if key is None else (self.state.keys.messaging_dedupe(destination.name, str(key)),
                                               self._dedupe_window_ms)
            outgoing.append((message_id, key, targets, dedupe))
        return outgoing

    @computed_once
    def _dedupe_window_ms(self) -> int:
        return int(self.state.settings["IMMUTANT_MESSAGING_DEDUPE_WINDOW"] * 1000)

    def _send(self, destination: Destination,
              outgoing: list[tuple[str, str | None, list[Target], tuple[str, int] | None]]) -> list[str | None]:
        """Hand the messages to the broker in one batch; their ids, ``None`` for duplicates."""
        if not outgoing or not outgoing[0][2]:
            return [item[0] for item in outgoing]  # a topic nobody subscribes to
        try:
            published = self.backend.publish_many(self._publishing_broker(),
                                                   [(targets, dedupe) for _id, _key, targets, dedupe in outgoing])
        except (TypeError, ValueError) as exc:  # json.dumps of the Dramatiq message, done once
            raise EncodeError(f"cannot encode the message for {destination.name} as JSON: {exc}") from None
        fresh_count = published.count(True)
        metrics.PUBLISHED.inc(destination.name, amount=fresh_count)
        if fresh_count == len(outgoing):  # no duplicates: the usual case
            return [item[0] for item in outgoing]
        ids: list[str | None] = []
        for (message_id, key, _targets, _dedupe), fresh in zip(outgoing, published, strict=True):
            if not fresh:
                log.info("dropped a duplicate of key %r on %s", key, destination.name)
            ids.append(message_id if fresh else None)
        return ids

    def _publishing_broker(self) -> Broker:
        return self.publisher

    def requeue_raw(self, raw: Any, *, delay: int | None = None) -> None:
        """Put a received Dramatiq message back on its queue (a copy; the original is acked)."""
        queue = raw.queue_name.removesuffix(".DQ")
        message: DramatiqMessage[Any] = DramatiqMessage(
            queue_name=queue, actor_name=raw.actor_name, args=tuple(raw.args), kwargs=dict(raw.kwargs),
            options={}, message_id=raw.message_id, message_timestamp=raw.message_timestamp,
        )
        self.backend.publish(self._publishing_broker(), [Target(message, delay)], None)

    # --- listening ---

    @overload
    def listen(self, name: str, handler: Handler, *, concurrency: int | None = None,
               selector: str | Selector | None = None, durable_name: str | None = None) -> Listener: ...

    @overload
    def listen(self, name: str, handler: None = None, *, concurrency: int | None = None,
               selector: str | Selector | None = None,
               durable_name: str | None = None) -> Callable[[Handler], Listener]: ...

    def listen(
        self,
        name: str,
        handler: Handler | None = None,
        *,
        concurrency: int | None = None,
        selector: str | Selector | None = None,
        durable_name: str | None = None,
    ) -> Listener | Callable[[Handler], Listener]:
        """Call ``handler(body)`` for messages on ``name``; returns a :class:`Listener`. Without a
        handler, returns a decorator."""
        if handler is None:
            def decorator(fn: Handler) -> Listener:
                return self.listen(name, fn, concurrency=concurrency, selector=selector, durable_name=durable_name)

            return decorator
        destination = self._destination(name)
        listener = Listener(self, destination, handler, concurrency=concurrency, selector=selector,
                            durable_name=durable_name)
        with self._lock:
            self.listeners.append(listener)
            engine = self.engine
        if engine is not None:
            self._register(destination)
            engine.bind(listener)
        return listener

    def unlisten(self, listener: Listener) -> None:
        with self._lock:
            if listener.stopped:
                return
            listener.stopped = True
            if listener in self.listeners:
                self.listeners.remove(listener)
            engine = self.engine
        if engine is not None:
            engine.unbind(listener)

    # --- request / respond ---

    def request(self, name: str, message: Any, *, timeout: float | None = 30.0, **options: Any) -> Response:
        """Publish ``message`` with a reply address; the returned :class:`Response`'s ``result()``
        waits for the answer of a :meth:`respond` handler."""
        correlation_id = options.pop("correlation_id", None) or uuid.uuid4().hex
        reply_to = self.state.keys.messaging_reply(correlation_id)
        self.publish(name, message, correlation_id=correlation_id, reply_to=reply_to, **options)
        return Response(self, name, correlation_id, timeout)

    def respond(self, name: str, fn: Handler | None = None, **options: Any) -> Any:
        """Answer requests on ``name`` with ``fn(body)``; a raising ``fn`` answers with the error."""
        if fn is None:
            return lambda f: self.respond(name, f, **options)
        ttl_ms = int(max(60.0, self.state.settings["IMMUTANT_FAILURE_TIMEOUT"]) * 1000)

        def responder(body: Any) -> None:
            current = current_message()
            try:
                reply: dict[str, Any] = {"ok": True, "value": fn(body)}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if current is None or not current.reply_to:
                return
            try:
                encoded = json.dumps(reply)
            except (TypeError, ValueError) as exc:
                encoded = json.dumps({"ok": False, "error": f"the response cannot be encoded as JSON: {exc}"})
            pipe = self.state.store.pipeline()
            pipe.rpush(current.reply_to, encoded)
            pipe.pexpire(current.reply_to, ttl_ms)
            pipe.execute()

        responder.__name__ = getattr(fn, "__name__", "responder")
        return self.listen(name, responder, **options)

    # --- runtime ---

    def runtime_started(self, runtime: RuntimeView) -> None:
        engine = Engine(self, runtime.app, self.state.node_name)
        for destination in list(self.destinations.values()):
            self._register(destination)
        engine.start()
        with self._lock:
            self.engine = engine
            listeners = list(self.listeners)
        for listener in listeners:
            self._register(listener.destination)
            engine.bind(listener)

    def runtime_stopping(self, runtime: RuntimeView) -> None:
        with self._lock:
            engine, self.engine = self.engine, None
        if engine is not None:
            engine.stop(timeout=stop_budget(runtime))
