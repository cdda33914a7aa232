"""The two Dramatiq brokers behind messaging, and what differs between them.

:class:`RedisBackend` uses Dramatiq's ``RedisBroker`` on the cluster store (or another Redis);
:class:`RabbitmqBackend` uses Dramatiq's ``RabbitmqBroker``. Both keep the cluster's own state
(destinations, subscriptions, consumer heartbeats, dead letters, idempotency keys) in the
cluster store, so the rest of the feature is the same on either.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import redis

from .. import lua
from ..keys import Keys
from .codec import new_id
from .redis_broker import RELEASE_TTL_MS, resuming_redis_broker

if TYPE_CHECKING:
    from dramatiq import Message
    from dramatiq.broker import Broker
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.middleware import Middleware

log = logging.getLogger("flask_immutant.messaging")

#: Dramatiq's own requeue of a dead worker's messages is replaced by the reaper here: it must
#: never fire for a live consumer busy in a long handler (its heartbeat comes from commands).
DRAMATIQ_HEARTBEAT_TIMEOUT = 7 * 86400 * 1000
#: RabbitMQ queues accept message priorities 0..9 (JMS's range; 4 is normal).
MAX_PRIORITY = 9
NORMAL_PRIORITY = 4


class Target(NamedTuple):
    """One Dramatiq message bound for one queue (``delay`` in ms, or None). A named tuple: never
    changed, and a dataclass's creation costs every command that imports this about 0.4 ms."""

    message: Message[Any]
    delay: int | None = None
    priority: int | None = None


#: One message to publish: its targets (one per queue) and its idempotency marker (key, ttl ms).
Outgoing = tuple[Sequence[Target], "tuple[str, int] | None"]


class Backend:
    """What a broker needs beyond Dramatiq: building it, atomic multi-queue publish, stats."""

    kind = "?"

    def __init__(self, store: redis.Redis, keys: Keys) -> None:
        self.store = store
        self.keys = keys

    @functools.cached_property
    def _reap(self) -> Any:
        """The reaper's script, read on first use: a backend made to read queue stats (``status``,
        ``queues``) runs none."""
        return lua.script(self.store, "messaging/backends_reap")

    def make_broker(self, middleware: Sequence[Middleware], consumer_id: str | None = None) -> Broker:
        raise NotImplementedError

    def publish(self, broker: Broker, targets: Sequence[Target], dedupe: tuple[str, int] | None) -> bool:
        """Write ``targets`` (all or, on error, possibly some); False if ``dedupe`` marked a duplicate."""
        return self.publish_many(broker, [(targets, dedupe)])[0]

    def publish_many(self, broker: Broker, batch: Sequence[Outgoing]) -> list[bool]:
        """Write each message's targets, in order; per message False if its dedupe marked a duplicate."""
        raise NotImplementedError

    def queue_stats(self, broker: Broker | None, queue: str) -> dict[str, int | None]:
        """depth, in_flight, delayed, and rejected: messages in the broker's own dead-letter queue."""
        raise NotImplementedError

    def delete_queue(self, broker: Broker, queue: str) -> None:
        raise NotImplementedError

    def counts(self, queues: Sequence[str]) -> dict[str, tuple[int, int] | None]:
        """``(waiting, rejected)`` of each queue as :meth:`queue_stats` counts them, for a metrics
        scrape: in as few round trips as the broker allows (one per queue here). ``None`` for a
        queue the broker did not count (unreachable): unknown is not 0."""
        found: dict[str, tuple[int, int] | None] = dict.fromkeys(queues)
        for queue in queues:
            stats = self.queue_stats(None, queue)
            depth, rejected = stats.get("depth"), stats.get("rejected")
            if depth is None:
                break  # unreachable: asking for every other queue would only wait as long again
            found[queue] = (int(depth), int(rejected or 0))
        return found

    def describe(self) -> str:
        raise NotImplementedError

    def reap(self, failure_timeout: float, leaving: str | None = None) -> list[tuple[str, int, dict[str, int]]]:
        """Requeue the unacked messages of dead consumers (or of ``leaving`` only, which stopped);
        returns ``(consumer id, requeued, requeued per Dramatiq queue)``."""
        args: list[Any] = [self.keys.messaging_namespace, self.keys.messaging_consumer(""), int(failure_timeout * 1000)]
        flat = self._reap(
            keys=[self.keys.messaging_consumers, self.keys.messaging_queues, self.keys.messaging_beats],
            args=args + ([leaving] if leaving else []),
        )
        found = []
        for index in range(0, len(flat), 3):
            name = flat[index].decode() if isinstance(flat[index], bytes) else str(flat[index])
            pairs = flat[index + 2] or []
            queues = {(q.decode() if isinstance(q, bytes) else str(q)): int(n) for q, n in zip(pairs[::2], pairs[1::2],
                                                                                            strict=True)}
            found.append((name, int(flat[index + 1]), queues))
        return found

    def wake(self, broker: Broker, queues: Sequence[str]) -> None:
        """End the waits of ``broker``'s idle consumers of ``queues`` (it is stopping)."""

    def dedupe_marked(self, dedupe: tuple[str, int] | None) -> bool:
        """Mark an idempotency key in the store; False if it was already marked."""
        if dedupe is None:
            return True
        key, ttl_ms = dedupe
        return bool(self.store.set(key, "1", nx=True, px=ttl_ms))

    def dedupe_marked_many(self, dedupes: Sequence[tuple[str, int] | None]) -> list[bool]:
        """:meth:`dedupe_marked` for each, in order and in one round trip."""
        pipe = self.store.pipeline(transaction=False)
        for dedupe in dedupes:
            if dedupe is not None:
                pipe.set(dedupe[0], "1", nx=True, px=dedupe[1])
        replies = iter(pipe.execute())
        return [True if dedupe is None else bool(next(replies)) for dedupe in dedupes]


class RedisBackend(Backend):
    """Dramatiq's Redis broker: queues are lists under ``Keys.messaging_namespace``."""

    kind = "redis"

    def __init__(self, store: redis.Redis, keys: Keys, client: redis.Redis | None = None, url: str = "") -> None:
        super().__init__(store, keys)
        self.client = client or store
        self.url = url
        self.namespace = keys.messaging_namespace

    @functools.cached_property
    def _publish(self) -> Any:
        return lua.script(self.client, "messaging/backends_publish")

    def make_broker(self, middleware: Sequence[Middleware], consumer_id: str | None = None) -> Broker:
        import dramatiq.worker

        # The consumer waits for the store itself (redis_broker.py), not a fixed 3 s.
        dramatiq.worker.CONSUMER_RESTART_DELAY_SECS = 0.0
        broker = resuming_redis_broker()(
            client=self.client, namespace=self.namespace, middleware=list(middleware),
            heartbeat_timeout=DRAMATIQ_HEARTBEAT_TIMEOUT,
            release_key=self.keys.messaging_release(consumer_id) if consumer_id else None,
        )
        if consumer_id:
            broker.broker_id = consumer_id  # its ack sets are named after it; the reaper finds them
        return broker

    def publish_many(self, broker: Broker, batch: Sequence[Outgoing]) -> list[bool]:
        """One script call (one round trip) for the whole batch: written whole, in order."""
        keys: list[str] = []
        args: list[Any] = [self.namespace]
        current_millis, dq_name, get_encoder = _dramatiq_helpers()
        encode = get_encoder().encode
        for targets, dedupe in batch:
            if dedupe:
                keys.append(dedupe[0])
            args.append(f"{dedupe[1] if dedupe else 0} {len(targets)}")
            for target in targets:
                message = target.message
                redis_id = new_id()
                options = {**message.options, "redis_message_id": redis_id}
                queue = message.queue_name
                if target.delay is not None:
                    queue = dq_name(queue)
                    options["eta"] = current_millis() + target.delay
                fields = {"queue_name": queue, "actor_name": message.actor_name, "args": message.args,
                          "kwargs": message.kwargs, "options": options, "message_id": message.message_id,
                          "message_timestamp": message.message_timestamp}
                front = target.priority is not None and target.priority > NORMAL_PRIORITY
                args.extend((f"{1 if front else 0}{redis_id} {queue}", encode(fields)))
        if len(args) == 1:
            return []
        return [int(written) >= 0 for written in self._publish(keys=keys, args=args)]

    def wake(self, broker: Broker, queues: Sequence[str]) -> None:
        release = getattr(broker, "release_key", None)
        if release is not None:  # one token for each consumer thread, which then sees the stop
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(release, *["1"] * (len(queues) + 1))
            pipe.pexpire(release, RELEASE_TTL_MS)
            pipe.execute()

    def queue_stats(self, broker: Broker | None, queue: str) -> dict[str, int | None]:
        base = f"{self.namespace}:{queue}"
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(base)
        pipe.hlen(f"{base}.msgs")
        pipe.hlen(f"{base}.DQ.msgs")
        pipe.zcard(f"{base}.XQ")
        waiting, stored, delayed, rejected = pipe.execute()
        return {"depth": int(waiting), "in_flight": max(0, int(stored) - int(waiting)), "delayed": int(delayed),
                "rejected": int(rejected)}

    def counts(self, queues: Sequence[str]) -> dict[str, tuple[int, int] | None]:
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            base = f"{self.namespace}:{queue}"  # Dramatiq's keys, as in queue_stats
            pipe.llen(base)
            pipe.zcard(f"{base}.XQ")
        replies = pipe.execute()
        return {queue: (int(replies[2 * i]), int(replies[2 * i + 1])) for i, queue in enumerate(queues)}

    def delete_queue(self, broker: Broker, queue: str) -> None:
        base = f"{self.namespace}:{queue}"
        self.client.delete(base, f"{base}.msgs", f"{base}.DQ", f"{base}.DQ.msgs", f"{base}.XQ", f"{base}.XQ.msgs",
                           self.keys.messaging_wake(queue))

    def describe(self) -> str:
        return "redis (cluster store)" if not self.url else "redis"


class RabbitmqBackend(Backend):
    """Dramatiq's RabbitMQ broker: one durable queue (plus ``.DQ``, ``.XQ``) per Dramatiq queue.

    RabbitMQ requeues a dead consumer's unacked messages itself when its connection drops, so the
    reaper only cleans up after it (subscriptions, heartbeats).
    """

    kind = "rabbitmq"

    def __init__(self, store: redis.Redis, keys: Keys, url: str) -> None:
        super().__init__(store, keys)
        self.url = url
        self._lock = threading.Lock()
        self._inspector: Any = None
        self._batch = threading.local()

    def make_broker(self, middleware: Sequence[Middleware], consumer_id: str | None = None) -> Broker:
        from .rabbitmq_broker import batching_rabbitmq_broker

        pika_log = logging.getLogger("pika")
        if pika_log.level == logging.NOTSET:
            pika_log.setLevel(logging.WARNING)  # pika says INFO for every connection and channel
        return batching_rabbitmq_broker()(url=self.url, middleware=list(middleware), confirm_delivery=True,
                                          max_priority=MAX_PRIORITY)

    def publish_many(self, broker: Broker, batch: Sequence[Outgoing]) -> list[bool]:
        """One message: Dramatiq's enqueue, confirmed. A batch: the idempotency keys marked in one
        round trip, then the messages in one transaction on a channel of their own (publisher
        confirms wait per message in pika's blocking client; a commit waits once for all)."""
        if len(batch) == 1:
            return [self._publish_one(broker, *batch[0])]
        current_millis, dq_name, _get_encoder = _dramatiq_helpers()
        marked = self.dedupe_marked_many([dedupe for _targets, dedupe in batch])
        keys = [dedupe[0] for (_targets, dedupe), fresh in zip(batch, marked, strict=True)
                if dedupe is not None and fresh]
        try:
            channel = self._batch_channel(broker)
            for (targets, _dedupe), fresh in zip(batch, marked, strict=True):
                if not fresh:
                    continue
                for target in targets:
                    broker.declare_queue(target.message.queue_name, ensure=True)  # type: ignore[call-arg]
                    message = target.message
                    if target.delay is not None:
                        message = message.copy(queue_name=dq_name(message.queue_name),
                                               options={"eta": current_millis() + target.delay})
                    channel.basic_publish(exchange="", routing_key=message.queue_name, body=message.encode(),
                                          properties=_pika_properties(target.priority))
            channel.tx_commit()
        except Exception:
            self._batch = threading.local()  # a failed channel is not used again
            if keys:
                self.store.delete(*keys)  # not published: let the publisher try again with the keys
            raise
        return marked

    def _batch_channel(self, broker: Broker) -> Any:
        """This thread's transactional channel on the broker's connection (opened on first use)."""
        connection = broker.connection  # type: ignore[attr-defined]
        channel = getattr(self._batch, "channel", None)
        if channel is None or not channel.is_open or getattr(self._batch, "connection", None) is not connection:
            channel = connection.channel()
            channel.tx_select()
            self._batch.channel, self._batch.connection = channel, connection
        return channel

    def _publish_one(self, broker: Broker, targets: Sequence[Target], dedupe: tuple[str, int] | None) -> bool:
        if dedupe is not None and not self.dedupe_marked(dedupe):
            return False
        try:
            for target in targets:
                message = target.message
                if target.priority is not None:
                    message = message.copy(options={"broker_priority": max(0, min(MAX_PRIORITY, target.priority))})
                broker.enqueue(message, delay=target.delay)
        except Exception:
            if dedupe is not None:
                self.store.delete(dedupe[0])  # not published: let the publisher try again with the key
            raise
        return True

    def queue_stats(self, broker: Broker | None, queue: str) -> dict[str, int | None]:
        """Ready messages from a passive declare; in flight comes from consumer heartbeats."""
        import pika
        from dramatiq.common import dq_name, xq_name

        with self._lock:
            for _attempt in range(2):
                try:
                    if self._inspector is None or self._inspector.is_closed:
                        self._inspector = pika.BlockingConnection(pika.URLParameters(self.url))
                    channel = self._inspector.channel()
                    try:
                        depth = channel.queue_declare(queue=queue, passive=True).method.message_count
                        delayed = channel.queue_declare(queue=dq_name(queue), passive=True).method.message_count
                        rejected = channel.queue_declare(queue=xq_name(queue), passive=True).method.message_count
                    finally:
                        if channel.is_open:
                            channel.close()
                    return {"depth": int(depth), "in_flight": None, "delayed": int(delayed),
                            "rejected": int(rejected)}
                except pika.exceptions.ChannelClosedByBroker:
                    return {"depth": 0, "in_flight": None, "delayed": 0, "rejected": 0}  # not declared yet
                except pika.exceptions.AMQPConnectionError:
                    self._inspector = None
        return {"depth": None, "in_flight": None, "delayed": None, "rejected": None}

    def delete_queue(self, broker: Broker, queue: str) -> None:
        from dramatiq.common import dq_name

        channel = cast("RabbitmqBroker", broker).channel  # this backend's make_broker made it
        for name in (queue, dq_name(queue), f"{queue}.XQ"):
            channel.queue_delete(queue=name)

    def close(self) -> None:
        with self._lock:
            if self._inspector is not None and self._inspector.is_open:
                self._inspector.close()
            self._inspector = None

    def describe(self) -> str:
        return "rabbitmq"


@functools.cache
def _dramatiq_helpers() -> tuple[Any, Any, Any]:
    """Dramatiq's ``current_millis``, ``dq_name`` and ``get_encoder``, imported on first publish
    (Dramatiq loads when messaging is used), then looked up once, not per publish."""
    from dramatiq.common import current_millis, dq_name
    from dramatiq.message import get_encoder

    return current_millis, dq_name, get_encoder


def _pika_properties(priority: int | None) -> Any:
    """The properties Dramatiq's RabbitMQ enqueue gives a message (persistent, with its priority)."""
    import pika

    return pika.BasicProperties(delivery_mode=2, priority=None if priority is None
                                else max(0, min(MAX_PRIORITY, priority)))


def make_backend(store: redis.Redis, keys: Keys, broker_url: str | None) -> Backend:
    if broker_url and broker_url.startswith(("amqp://", "amqps://")):
        return RabbitmqBackend(store, keys, broker_url)
    if broker_url:
        from ..store import client_from_url

        return RedisBackend(store, keys, client_from_url(broker_url), url=broker_url)
    return RedisBackend(store, keys)


def heartbeat_record(**fields: Any) -> str:
    return json.dumps(fields, sort_keys=True)
