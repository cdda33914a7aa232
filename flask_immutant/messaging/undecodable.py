"""Messages a consumer cannot take: never raised in the consumer, always dead-lettered with why.

Dramatiq decodes a message inside its consumer. On the Redis broker an exception there ends the
consumer with its whole prefetched batch unacknowledged (and the heartbeat alive, so nobody ever
requeues it); on RabbitMQ the consumer rejects it to the broker's own dead-letter queue with no
reason. Here Dramatiq's pluggable encoder is wrapped so that decoding never raises: anything that
is not a Dramatiq message becomes a stand-in carrying the reason. The guarded consumer then moves
stand-ins, and messages for an actor this process does not have, to the cluster's dead-letter
store with their reason, acknowledges them, and carries on with the rest of the batch at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.broker import Broker, Consumer, MessageProxy
from dramatiq.encoder import Encoder, JSONEncoder

log = logging.getLogger("flask_immutant.messaging")

#: Option key of a stand-in message: why the real one could not be decoded.
UNDECODABLE = "immutant_undecodable"
#: Characters of a decoding error kept in the reason.
REASON_LENGTH = 300
#: Bytes of an undecodable message kept (as text) in its dead-letter record.
RAW_PREVIEW = 1000

#: The fields of a Dramatiq message and the JSON types they must have.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "queue_name": str, "actor_name": str, "args": list, "kwargs": dict, "options": dict,
    "message_id": str, "message_timestamp": (int, float),
}

#: The same, as pairs; a field of several types is never an exact match, so it takes the long test.
_FIELD_TYPES = tuple(_FIELDS.items())

#: Dramatiq's JSONEncoder's ``json.dumps(data, separators=(",", ":"))``, made once.
_COMPACT = json.JSONEncoder(separators=(",", ":"))

#: Called with (queue, message id, reason, raw bytes or None, the Dramatiq message or None).
DeadLetter = Callable[[str, str, str, Any, Any], None]


class _Decoding(threading.local):
    raw: Any = None


_decoding = _Decoding()


class TolerantEncoder(Encoder):
    """Encodes like the encoder it wraps; decodes anything, turning garbage into a stand-in."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        # Dramatiq's JSONEncoder calls json.dumps with separators, which builds a new encoder for
        # every message; the same encoder made once gives the same bytes.
        self._dumps = _COMPACT.encode if type(inner) is JSONEncoder else None

    def encode(self, data: Any) -> bytes:
        if self._dumps is not None:
            return self._dumps(data).encode("utf-8")
        return self.inner.encode(data)

    def decode(self, data: bytes) -> Any:
        _decoding.raw = data  # the consumer's thread: the guard finds a bad message's bytes here
        try:
            fields = self.inner.decode(data)
            problem = shape_problem(fields)
        except Exception as exc:
            cause = getattr(exc, "error", None) or exc  # Dramatiq's DecodeError quotes all the data
            problem = f"not a Dramatiq message: {type(cause).__name__}: {cause}"[:REASON_LENGTH]
        if problem is None:
            return fields
        return {"queue_name": "", "actor_name": "", "args": [], "kwargs": {},
                "options": {UNDECODABLE: problem}, "message_id": str(uuid.uuid4()), "message_timestamp": 0}


def shape_problem(fields: Any) -> str | None:
    """Why ``fields`` cannot make a Dramatiq message, or None (on every message: kept cheap)."""
    if not isinstance(fields, dict):
        return f"not a Dramatiq message: a JSON {type(fields).__name__}, not an object"
    if fields.keys() != _FIELDS.keys():
        missing, extra = sorted(_FIELDS.keys() - fields.keys()), sorted(fields.keys() - _FIELDS.keys())
        return f"not a Dramatiq message: missing {missing}, unexpected {extra}"
    for name, kind in _FIELD_TYPES:
        value = fields[name]
        # JSON decodes to exactly these types: one identity check each, the long test otherwise
        if type(value) is not kind and (type(value) is bool or not isinstance(value, kind)):
            return f"not a Dramatiq message: {name} is a {type(value).__name__}"
    return None


def fields_of(message: Any) -> Any:
    """The Dramatiq ``Message`` a ``MessageProxy`` wraps (anything else as it is), whose fields
    read directly: each read through the proxy's ``__getattr__``, which runs after a failed
    look-up, costs 0.4 us. ``_message`` is pinned by a contract test; without it, the proxy."""
    return vars(message).get("_message", message)


def use_tolerant_encoder() -> None:
    """Wrap the process's Dramatiq encoder (once); the wire format does not change."""
    current = dramatiq.get_encoder()
    if not isinstance(current, TolerantEncoder):
        dramatiq.set_encoder(TolerantEncoder(current if current is not None else JSONEncoder()))


def guard_consumers(broker: Broker, dead_letter: DeadLetter) -> None:
    """Make every consumer of ``broker`` dead-letter what it cannot deliver instead of raising."""
    use_tolerant_encoder()
    consume = broker.consume

    def guarded(queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        return GuardedConsumer(broker, consume(queue_name, prefetch=prefetch, timeout=timeout),
                               queue_name, dead_letter)

    broker.consume = guarded  # type: ignore[method-assign]  # this broker instance's, on purpose


def on_redis(broker: Broker) -> bool:
    """Whether ``broker`` is Dramatiq's Redis broker or a subclass (ours resumes: redis_broker.py);
    there a message's broker id is inside it, so an unreadable one is found by its bytes."""
    from dramatiq.brokers.redis import RedisBroker  # redis is a core dependency; pika is not

    return isinstance(broker, RedisBroker)


class GuardedConsumer(Consumer):
    """A Dramatiq consumer that hands the worker only messages it can process."""

    def __init__(self, broker: Broker, inner: Consumer, queue_name: str, dead_letter: DeadLetter) -> None:
        self.broker = broker
        self.inner = inner
        self.queue_name = queue_name
        self.dead_letter = dead_letter
        self.on_redis = on_redis(broker)

    def __getattr__(self, name: str) -> Any:  # outstanding_message_count and the like
        return getattr(self.inner, name)

    def ack(self, message: MessageProxy) -> None:
        self.inner.ack(message)

    def nack(self, message: MessageProxy) -> None:
        self.inner.nack(message)

    def requeue(self, messages: Any) -> None:
        self.inner.requeue(messages)

    def close(self) -> None:
        self.inner.close()

    def __iter__(self) -> GuardedConsumer:
        return self

    def __next__(self) -> MessageProxy | None:
        while True:
            message = next(self.inner)
            if message is None:
                return None
            reason = self.refusal(message)
            if reason is None:
                return message
            self.refuse(message, reason, _decoding.raw)

    def refusal(self, message: Any) -> str | None:
        """Why this process cannot deliver ``message``, or None."""
        fields = fields_of(message)
        options = fields.options
        problem = options.get(UNDECODABLE)
        if problem is not None:
            return str(problem)
        if self.on_redis and not isinstance(options.get("redis_message_id"), str):
            return "not a Dramatiq message: options.redis_message_id is missing"
        if fields.actor_name not in self.broker.actors:
            return f"unknown actor {message.actor_name!r} on queue {self.queue_name!r}"
        if fields.queue_name != self.queue_name:
            # Dramatiq settles a message through the consumer its queue_name names: another one
            # would refuse it (held unacknowledged) or none exists (a KeyError kills the worker)
            return f"queue_name {fields.queue_name!r} is not the queue it arrived on ({self.queue_name!r})"
        return None

    def refuse(self, message: Any, reason: str, raw: Any) -> None:
        """Dead-letter ``message`` and acknowledge it; if the store cannot take it, reject it to
        the broker's own dead-letter queue (both are counted by ``flask immutant queues``)."""
        undecodable = UNDECODABLE in message.options or (
            self.on_redis and not isinstance(message.options.get("redis_message_id"), str))
        if self.on_redis and undecodable:
            redis_id = self._redis_id_of(raw)
            if redis_id is None:  # requeued by a reaper meanwhile: acking nothing frees its slot
                log.warning("undecodable message on %s has vanished: %s", self.queue_name, reason)
                message.options["redis_message_id"] = ""
                self.inner.ack(message)
                return
            message.options["redis_message_id"] = redis_id
        queue = self.queue_name.removesuffix(".DQ")
        try:
            self.dead_letter(queue, message.message_id, reason, raw if undecodable else None,
                             None if undecodable else message)
        except Exception:
            log.exception("could not dead-letter message %s on %s (%s); rejecting it to the broker's "
                          "dead-letter queue", message.message_id, queue, reason)
            self.inner.nack(message)
            return
        self.inner.ack(message)

    def _redis_id_of(self, raw: Any) -> str | None:
        """The Redis broker's id of a fetched message, found by its bytes among this consumer's
        unacknowledged messages (the id is inside the message, which could not be read)."""
        from .redis_broker import fetched_ids

        ids = fetched_ids(self.broker, self.queue_name, [raw])
        return ids[0] if ids else None


def dead_letter_record(queue: str, message_id: str, reason: str, raw: Any, message: Any) -> dict[str, Any]:
    """The dead-letter record of a message no consumer could take (the schema of
    :meth:`Engine.bury`'s, with ``message`` None and the raw bytes' start when it was unreadable)."""
    record: dict[str, Any] = {
        "id": message_id, "queue": queue, "destination": None, "reason": f"MalformedMessage: {reason}",
        "malformed": True, "attempts": 1, "retries": 0, "failed_at": round(time.time(), 3), "traceback": "",
        "message": None,
    }
    if message is not None:
        record["message"] = {"actor_name": message.actor_name, "args": list(message.args),
                             "kwargs": message.kwargs, "message_id": message.message_id,
                             "message_timestamp": message.message_timestamp}
    if raw is not None:
        text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw)
        record["raw"] = text[:RAW_PREVIEW]
    return record


def encoded(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, default=repr)
