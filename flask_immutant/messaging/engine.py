"""The consuming side, in an app runtime process: one Dramatiq worker, one consumer identity
with its own heartbeat, and the reaper that gives a dead consumer's messages to the living.

Failover does not wait for Dramatiq's own dead-worker requeue (60 s, then only on a random
0.1% of commands). Each runtime process is a consumer with a heartbeat key whose TTL is
``IMMUTANT_FAILURE_TIMEOUT``, renewed from its own thread every eighth of it, so a handler busy
for minutes keeps it alive. Every consumer also runs the reaper: when a heartbeat key is gone,
one atomic script pushes that consumer's unacknowledged messages back to the head of their
queues (Redis broker). On RabbitMQ the server requeues them when the dead process's connection
drops; the reaper then only removes the dead consumer's topic subscriptions.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import threading
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import dramatiq
import redis
from dramatiq.middleware import Retries

from .. import events, lua
from ..loops import Loop
from ..metrics import definitions as metrics
from ..records import hash_of, json_object, read_records
from .backends import Backend, heartbeat_record
from .codec import Message, decode
from .destination import Destination, actor_name
from .errors import MalformedMessage
from .status import destination_queues
from .undecodable import dead_letter_record, encoded, fields_of, guard_consumers
from .workqueue import ClosableWorkQueue

if TYPE_CHECKING:
    from ..protocols import StateView
    from ..tracing.spans import Tracing

log = logging.getLogger("flask_immutant.messaging")


class Owner(Protocol):
    """What the engine uses of the app's messaging (``core.Messaging``, which makes the engine):
    a protocol, so this module does not import the one that imports it."""

    @property
    def state(self) -> StateView: ...

    @property
    def backend(self) -> Backend: ...

    def known_topics(self) -> list[str]: ...

    def requeue_raw(self, raw: Any, *, delay: int | None = None) -> None: ...

    @property
    def tracing(self) -> Tracing | None: ...


class Listener(Protocol):
    """What the engine uses of a listener (``core.Listener``): where it listens, and its handler."""

    #: The Dramatiq queue it is bound to, set by :meth:`Engine.bind`.
    queue: str | None

    @property
    def destination(self) -> Destination: ...

    @property
    def durable_name(self) -> str | None: ...

    @property
    def number(self) -> int: ...

    def accepts(self, properties: Mapping[str, Any]) -> bool: ...

    def handle(self, message: Message) -> Any: ...

#: Heartbeats per failure timeout (the membership heartbeat uses 4; consumers are cheaper to
#: renew and a quicker reaper shortens failover).
BEATS_PER_TIMEOUT = 8
#: Seconds a queue message no local listener's selector accepts waits before it is offered again.
UNSELECTED_DELAY_MS = 1000


class _Local(threading.local):
    message: Any = None
    current: Message | None = None


_local = _Local()


def current_message() -> Message | None:
    """The message being handled on this thread (metadata: properties, id, correlation id...)."""
    return _local.current


class DeadLetters(Retries):
    """Dramatiq's retries with backoff; a message that exhausts them (or is malformed) is moved to
    the cluster's dead-letter store with its reason and acknowledged, on either broker. If the store
    cannot take it, it stays failed and goes to the broker's own dead-letter queue.

    It also remembers the Dramatiq message being processed on each worker thread (for
    :meth:`Engine.deliver`): one middleware rather than two, as Dramatiq calls every hook of every
    middleware for every message."""

    def __init__(self, engine: Engine, **options: Any) -> None:
        super().__init__(**options)
        self.engine = engine

    def before_process_message(self, broker: Any, message: Any) -> None:
        _local.message = message

    def after_skip_message(self, broker: Any, message: Any) -> None:
        _local.message = None

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None) -> None:
        _local.message = None
        _local.current = None
        if exception is None:
            return  # Dramatiq's Retries does nothing either then
        super().after_process_message(  # type: ignore[no-untyped-call]  # Dramatiq's hook is unannotated
            broker, message, result=result, exception=exception)
        if not message.failed:
            metrics.RETRIED.inc(_destination_of(message))
            return
        try:
            self.engine.bury(message, exception)
        except redis.RedisError:
            log.exception("could not record dead message %s; left on the broker's dead-letter queue",
                          message.message_id)
            return
        message.failed = False


class Binding:
    """One Dramatiq queue this process consumes, and the local listeners it feeds."""

    def __init__(self, destination: Destination, queue: str, owned: bool) -> None:
        self.destination = destination
        self.queue = queue
        #: True for a non-durable topic subscription: the queue dies with its listener.
        self.owned = owned
        #: Replaced whole, never changed in place (under the engine's lock): a worker thread
        #: reads it without a lock or a copy.
        self.listeners: tuple[Listener, ...] = ()
        self._turn = itertools.count()

    def choose(self, properties: Any) -> Listener | None:
        listeners = self.listeners
        if len(listeners) == 1:  # the usual case: no turn to take
            return listeners[0] if listeners[0].accepts(properties) else None
        if not listeners:
            return None
        start = next(self._turn)
        for offset in range(len(listeners)):
            listener = listeners[(start + offset) % len(listeners)]
            if listener.accepts(properties):
                return listener
        return None


class HandlerCounts:
    """Per queue, the handlers running now and the messages handled since the last beat (for the
    heartbeat record and the console's history). Worker threads update them and the heartbeat
    reads them: one lock, as ``+=`` on a dict item is not atomic across threads (counts were
    lost, and a heartbeat listing the dict while a worker added a queue raised)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: defaultdict[str, int] = defaultdict(int)
        self._handled: defaultdict[str, int] = defaultdict(int)

    def started(self, queue: str) -> None:
        with self._lock:
            self._running[queue] += 1

    def finished(self, queue: str) -> None:
        with self._lock:
            self._running[queue] -= 1
            self._handled[queue] += 1

    def running(self) -> dict[str, int]:
        with self._lock:
            return {queue: n for queue, n in self._running.items() if n}

    def handled(self) -> dict[str, int]:
        """Handled since the last :meth:`counted`."""
        with self._lock:
            return {queue: n for queue, n in self._handled.items() if n}

    def counted(self, counts: dict[str, int]) -> None:
        """``counts`` (from :meth:`handled`) reached the cluster's counters."""
        with self._lock:
            for queue, n in counts.items():
                self._handled[queue] -= n


class Engine:
    """The runtime's consumer: worker, heartbeat and reaper threads, and the local bindings."""

    def __init__(self, messaging: Owner, app: Any, node_name: str) -> None:
        self.messaging = messaging
        self.app = app
        self.settings = messaging.state.settings
        self.keys = messaging.state.keys
        self.backend: Backend = messaging.backend
        self.node_name = node_name
        self.consumer_id = f"{node_name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.failure_timeout: float = self.settings["IMMUTANT_FAILURE_TIMEOUT"]
        self._dedupe_window_ms = int(self.settings["IMMUTANT_MESSAGING_DEDUPE_WINDOW"] * 1000)
        self.interval = self.failure_timeout / BEATS_PER_TIMEOUT
        self.bindings: dict[str, Binding] = {}
        self.counts = HandlerCounts()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._loops: list[Loop] = []
        self._heartbeat = lua.script(messaging.state.store, "messaging/engine_heartbeat")
        self.broker = self.backend.make_broker(
            [
                DeadLetters(
                    self,
                    max_retries=self.settings["IMMUTANT_MESSAGING_MAX_RETRIES"],
                    min_backoff=int(self.settings["IMMUTANT_MESSAGING_MIN_BACKOFF"] * 1000),
                    max_backoff=int(self.settings["IMMUTANT_MESSAGING_MAX_BACKOFF"] * 1000),
                ),
            ],
            consumer_id=self.consumer_id,
        )
        # Dramatiq declares an actor's queue (which starts its consumer) before it records the
        # actor; a message already waiting would then find no actor and be dead-lettered.
        # (method-assign: the method of this one broker instance is replaced, on purpose)
        self.broker.declare_actor = functools.partial(_declare_actor_first, self.broker)  # type: ignore[method-assign]
        guard_consumers(self.broker, self.bury_undeliverable)
        threads = self.settings["IMMUTANT_WORKER_THREADS"]
        poll_ms = int(min(1000, max(50, self.interval * 2000)))
        self.worker = dramatiq.Worker(self.broker, worker_threads=threads, worker_timeout=poll_ms)
        self.worker.work_queue = self._work_queue = ClosableWorkQueue()  # before start: threads take it there

    # --- lifecycle ---

    def start(self) -> None:
        self.beat()  # registered before the first fetch, so the reaper always knows our ack sets
        self.worker.start()
        self._loops = [Loop("mq-heartbeat", self.beat, self.interval, wait_first=True, backoff_cap=self.interval,
                            stop_event=self._stop).start(),
                       Loop("mq-reaper", self._reap, self.interval, wait_first=True, stop_event=self._stop).start()]

    def stop(self, timeout: float) -> None:
        """Finish handlers in progress (bounded), put prefetched messages back, leave."""
        stopping = getattr(self.broker, "stopping", None)
        if stopping is not None:
            stopping.set()  # idle consumers poll from now on, until Dramatiq stops them
        try:
            self.backend.wake(self.broker, list(self.bindings))  # our idle consumers stop now, not after their wait
        except redis.RedisError as exc:
            log.debug("could not wake idle consumers: %s", exc)
        deadline = time.monotonic() + timeout
        self._release_worker(deadline)
        self.worker.stop(timeout=int(max(0.0, deadline - time.monotonic()) * 1000))
        for loop in self._loops:
            loop.stop(timeout=1.0)
        try:
            left = self._send_pending_acks()  # while our heartbeat still keeps other reapers off
            if left:
                log.warning("messaging: %d handled message(s) could not be acknowledged and will run again", left)
            for binding in list(self.bindings.values()):
                if binding.owned:
                    self._drop_subscription(binding)
            self.messaging.state.store.delete(self.keys.messaging_consumer(self.consumer_id))
            # anything still unacked (a handler outlived the timeout) goes back now
            self.backend.reap(self.failure_timeout, leaving=self.consumer_id)
        except redis.RedisError as exc:
            log.warning("messaging could not leave cleanly (%s); the reaper of another node will", exc)
        self.broker.close()

    def _release_worker(self, deadline: float) -> None:
        """The first half of Dramatiq's ``Worker.stop``, in its order but without its sleeps: the
        worker threads are told to stop and woken (handlers in progress finish, until ``deadline``,
        while the consumers keep polling, as Dramatiq has it), then the consumer threads, woken from
        their wait between two polls. ``Worker.stop`` then finds every thread ending."""
        workers = list(self.worker.workers)
        for thread in workers:
            thread.stop()
        self._work_queue.close()  # idle worker threads see the stop now, not after their poll
        for thread in workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        consumers = list(self.worker.consumers.values())
        for consumer in consumers:
            consumer.stop()
        released = getattr(self.broker, "released", None)
        if released is not None:
            released.set()
        # Worker.stop closes each consumer once joined, or at once when no time is left; a consumer
        # thread still in its poll (up to worker_timeout: pika's wait is not released) would then
        # share its connection with the closing thread. So each gets its poll's length, whatever
        # handlers that overran the deadline have left.
        ends = max(deadline, time.monotonic() + self.worker.worker_timeout / 1000 + 0.5)
        for consumer in consumers:
            consumer.join(max(0.0, ends - time.monotonic()))

    # --- bindings ---

    def bind(self, listener: Listener) -> None:
        """Start consuming for ``listener`` (its queue, or its own subscription to a topic)."""
        destination = listener.destination
        store = self.messaging.state.store
        with self._lock:
            if destination.kind == "queue":
                queue, owned = destination.queue_name, False
            elif listener.durable_name:
                queue, owned = destination.subscription_queue(f"durable-{listener.durable_name}"), False
            else:
                queue, owned = destination.subscription_queue(f"{self.consumer_id}-{listener.number}"), True
            listener.queue = queue
            binding = self.bindings.get(queue)
            if binding is None:
                binding = self.bindings[queue] = Binding(destination, queue, owned)
                store.sadd(self.keys.messaging_queues, queue)
                if destination.kind == "topic":
                    record = {"owner": self.consumer_id if owned else None, "durable": listener.durable_name}
                    store.hset(self.keys.messaging_subscriptions(destination.name), queue, heartbeat_record(**record))
                binding.listeners += (listener,)
                self._consume(queue)
            else:
                binding.listeners += (listener,)
        log.info("messaging: consuming %s%s (queue %s)", destination.name,
                 f" as {listener.durable_name!r}" if listener.durable_name else "", queue)

    def unbind(self, listener: Listener) -> None:
        with self._lock:
            binding = self.bindings.get(listener.queue or "")
            if binding is None or listener not in binding.listeners:
                return
            binding.listeners = tuple(other for other in binding.listeners if other is not listener)
            if binding.listeners:
                return
            del self.bindings[binding.queue]
            for name in (binding.queue, f"{binding.queue}.DQ"):
                consumer = self.worker.consumers.get(name)
                if consumer is not None:
                    consumer.stop()
            if binding.owned:
                self._drop_subscription(binding)
        log.info("messaging: stopped consuming %s (queue %s)", binding.destination.name, binding.queue)

    def _consume(self, queue: str) -> None:
        name = actor_name(queue)
        if name not in self.broker.actors:
            dramatiq.Actor(self._deliverer(queue), broker=self.broker, actor_name=name, queue_name=queue,
                           priority=0, options={"throws": (MalformedMessage,)})
            return
        for consumer_queue in (queue, f"{queue}.DQ"):  # consumed before, then stopped: restart it
            old = self.worker.consumers.get(consumer_queue)
            if old is not None and not old.running:
                del self.worker.consumers[consumer_queue]
                self.worker._add_consumer(consumer_queue, delay=consumer_queue.endswith(".DQ"))

    def _drop_subscription(self, binding: Binding) -> None:
        store = self.messaging.state.store
        store.hdel(self.keys.messaging_subscriptions(binding.destination.name), binding.queue)
        store.srem(self.keys.messaging_queues, binding.queue)
        try:
            self.backend.delete_queue(self.broker, binding.queue)
        except Exception as exc:  # the broker may be gone while stopping
            log.debug("could not delete subscription queue %s: %s", binding.queue, exc)

    # --- delivery ---

    def _deliverer(self, queue: str) -> Callable[[Any], None]:
        def deliver(envelope: Any) -> None:
            self.deliver(queue, envelope)

        deliver.__name__ = deliver.__qualname__ = f"deliver_{queue}"
        return deliver

    def deliver(self, queue: str, envelope: Any) -> None:
        raw = _local.message
        if raw is None:
            message = decode(envelope)
        else:
            fields = fields_of(raw)
            message = decode(envelope, retries=fields.options.get("retries", 0), message_id=fields.message_id)
        if message.expired:
            log.debug("dropping expired message %s on %s", message.id, message.destination)
            return
        done_key = self.keys.messaging_done(queue, message.key) if message.key else None
        if done_key and self.messaging.state.store.exists(done_key):
            log.info("dropping duplicate message with key %r on %s", message.key, message.destination)
            return
        binding = self.bindings.get(queue)
        listener = binding.choose(message.properties) if binding is not None else None
        if binding is None or listener is None:
            if binding is not None and binding.destination.kind == "topic":
                return  # this subscriber's selector does not take it
            if raw is not None:  # a queue message no local listener takes: offer it again
                self.messaging.requeue_raw(raw, delay=UNSELECTED_DELAY_MS)
            return
        destination = message.destination
        tracing = self.messaging.tracing
        _local.current = message
        self.counts.started(queue)
        started = time.perf_counter()
        try:
            metrics.IN_FLIGHT.inc(destination)
            with self.app.app_context():
                if tracing is None:
                    listener.handle(message)
                else:
                    with self._processing(tracing, message, binding):
                        listener.handle(message)
        except BaseException:
            metrics.FAILED.inc(destination)
            raise
        else:
            metrics.DELIVERED.inc(destination)
        finally:
            self.counts.finished(queue)  # our own bookkeeping first: it never waits on a metric
            _local.current = None
            metrics.HANDLER_SECONDS.observe(time.perf_counter() - started, destination)
            metrics.IN_FLIGHT.dec(destination)
        if done_key:
            self.messaging.state.store.set(done_key, "1", px=self._dedupe_window_ms)

    def _processing(self, tracing: Tracing, message: Message,
                    binding: Binding) -> contextlib.AbstractContextManager[Any]:
        """The span the handler runs in (child of the publisher's)."""
        subscription = binding.queue if binding.destination.kind == "topic" else None
        return tracing.processing(message, self.backend.kind, subscription)

    def bury(self, raw: Any, exception: BaseException) -> None:
        """Move a failed message to the dead-letter store, with its reason."""
        queue = raw.queue_name.removesuffix(".DQ")
        envelope = raw.args[0] if raw.args else None
        malformed = isinstance(exception, MalformedMessage)
        # Dramatiq counts the failed attempt before giving up, except for ``throws`` exceptions.
        attempts = int(raw.options.get("retries", 0)) + (1 if malformed else 0)
        record = {
            "id": raw.message_id,
            "queue": queue,
            "destination": envelope.get("destination") if isinstance(envelope, dict) else None,
            "reason": f"{type(exception).__name__}: {exception}",
            "malformed": malformed,
            "attempts": attempts,
            "retries": max(0, attempts - 1),
            "failed_at": round(time.time(), 3),
            "traceback": "".join(traceback.format_exception(exception))[-4000:],
            "message": {"actor_name": raw.actor_name, "args": list(raw.args), "kwargs": raw.kwargs,
                        "message_id": raw.message_id, "message_timestamp": raw.message_timestamp},
        }
        pipe = self.messaging.state.store.pipeline()
        pipe.hset(self.keys.messaging_dead(queue), raw.message_id, heartbeat_record(**record))
        events.record(pipe, self.keys, "message.dead", queue=queue, destination=record["destination"],
                      message_id=raw.message_id, reason=record["reason"], attempts=attempts)
        pipe.execute()
        metrics.DEAD_LETTERED.inc(record["destination"] or queue)
        log.warning("message %s on %s is dead: %s", raw.message_id, record["destination"], record["reason"])

    def bury_undeliverable(self, queue: str, message_id: str, reason: str, raw: Any, message: Any) -> None:
        """Dead-letter a message the consumer could not decode or has no actor for."""
        record = dead_letter_record(queue, message_id, reason, raw, message)
        pipe = self.messaging.state.store.pipeline()
        pipe.hset(self.keys.messaging_dead(queue), message_id, encoded(record))
        events.record(pipe, self.keys, "message.dead", queue=queue, destination=None, message_id=message_id,
                      reason=record["reason"], attempts=record.get("attempts"))
        pipe.execute()
        metrics.DEAD_LETTERED.inc(str(record.get("destination") or queue))
        log.warning("message %s on %s is dead: %s", message_id, queue, record["reason"])

    # --- heartbeat and reaper ---

    def beat(self) -> None:
        record = heartbeat_record(
            node=self.node_name, pid=os.getpid(), broker=self.backend.kind,
            queues=sorted(self.bindings), in_flight=self.counts.running(),
            prefetched=self._prefetched(),
        )
        self._heartbeat(
            keys=[self.keys.messaging_consumer(self.consumer_id), self.keys.messaging_consumers,
                  self.keys.messaging_beats],
            args=[self.consumer_id, record, int(self.failure_timeout * 1000)],
        )
        self._count_handled()

    def _count_handled(self) -> None:
        """Add what was handled since the last beat to the cluster's per-queue counters."""
        counts = self.counts.handled()
        if not counts:
            return
        pipe = self.messaging.state.store.pipeline(transaction=False)
        for queue, n in counts.items():
            pipe.hincrby(self.keys.messaging_handled, queue, n)
        pipe.execute()
        self.counts.counted(counts)

    def _prefetched(self) -> dict[str, int]:
        """RabbitMQ: messages delivered to this process and not yet acknowledged, per queue."""
        if self.backend.kind != "rabbitmq":  # the backend made the broker (and may subclass it)
            return {}
        counts: dict[str, int] = {}
        for name, thread in list(self.worker.consumers.items()):
            consumer = thread.consumer
            outstanding = getattr(consumer, "outstanding_message_count", None) if consumer else None
            if outstanding:
                key = name.removesuffix(".DQ")
                counts[key] = counts.get(key, 0) + int(outstanding)
        return counts

    def _reap(self) -> None:
        self._send_pending_acks(older_than=self.interval)
        self.reap_once()

    def _send_pending_acks(self, older_than: float = 0.0) -> int:
        """Redis: send acknowledgements listed for ``older_than`` seconds, which no consumer thread
        sends (its consumer closed while the store refused them: redis_acks.py); how many are left."""
        pending = getattr(self.broker, "pending_acks", None)
        return 0 if pending is None else int(pending.send_all(older_than))

    def reap_once(self) -> list[tuple[str, int, dict[str, int]]]:
        """Give the unacknowledged messages of dead consumers back to their queues."""
        dead = self.backend.reap(self.failure_timeout)
        for consumer_id, moved, per_queue in dead:
            log.warning("messaging: consumer %s is gone; %d unacknowledged message(s) requeued", consumer_id, moved)
            for destination, count in self._destinations_of(per_queue).items():
                metrics.REDELIVERED.inc(destination, amount=count)
        if dead:
            self._drop_dead_subscriptions({consumer_id for consumer_id, *_ in dead})
        return dead

    def _destinations_of(self, per_queue: dict[str, int]) -> dict[str, int]:
        """Counts per Dramatiq queue, summed per destination name (a queue this process does
        not know keeps its own name)."""
        names = {queue: binding.destination.name for queue, binding in list(self.bindings.items())}
        if any(queue not in names for queue in per_queue):
            store, keys = self.messaging.state.store, self.messaging.state.keys
            names.update((queue, name) for name, queues in destination_queues(store, keys).items() for queue in queues)
        summed: dict[str, int] = {}
        for queue, count in per_queue.items():
            summed[names.get(queue, queue)] = summed.get(names.get(queue, queue), 0) + count
        return summed

    def _drop_dead_subscriptions(self, dead: set[str]) -> None:
        store = self.messaging.state.store
        for topic in self.messaging.known_topics():
            key = self.keys.messaging_subscriptions(topic)
            for name, record in read_records(hash_of(store, key, "subscription"), "subscription", json_object).items():
                if record.get("owner") in dead:
                    store.hdel(key, name)
                    store.srem(self.keys.messaging_queues, name)
                    try:
                        self.backend.delete_queue(self.broker, name)
                    except Exception as exc:
                        log.debug("could not delete subscription queue %s: %s", name, exc)


def _destination_of(raw: Any) -> str:
    """The destination a Dramatiq message was published to (its queue when it does not say)."""
    envelope = raw.args[0] if raw.args else None
    destination = envelope.get("destination") if isinstance(envelope, dict) else None
    return destination if isinstance(destination, str) else str(raw.queue_name).removesuffix(".DQ")


def _declare_actor_first(broker: Any, actor: Any) -> None:
    broker.emit_before("declare_actor", actor)
    broker.actors[actor.actor_name] = actor
    broker.declare_queue(actor.queue_name)
    broker.emit_after("declare_actor", actor)
