"""Dramatiq's RabbitMQ broker, whose consumers hand their acknowledgements over in batches.

A worker thread that has handled a message acknowledges it on the consumer's connection, which
only the consumer thread may use: Dramatiq's consumer queues one callback per message there
(``add_callback_threadsafe``), and each one writes to the connection's wake-up socket and wakes
the consumer thread from its poll. Here a worker thread adds the delivery tag to a list and queues
a callback only when the list was empty; that callback acknowledges every tag listed by the time
it runs, one ``basic_ack`` per message as before. Each message is still acknowledged after its
handler returned, and only then; what is saved is a wake-up (a system call and a pass of pika's
I/O loop) for every acknowledgement that finds one already on its way.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

log = logging.getLogger("flask_immutant.messaging")


@functools.cache
def batching_rabbitmq_broker() -> type[RabbitmqBroker]:
    """The broker class (made on first use: pika is an optional dependency)."""
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    class BatchingRabbitmqBroker(RabbitmqBroker):
        @property
        def consumer_class(self) -> type:
            return batching_consumer(super().consumer_class)

    return BatchingRabbitmqBroker


@functools.cache
def batching_consumer(base: type) -> type:
    import pika.exceptions
    from dramatiq.errors import ConnectionClosed

    class BatchingConsumer(base):  # type: ignore[misc]  # a base chosen at run time is Any to mypy
        """Dramatiq's RabbitMQ consumer, with acknowledgements handed over in batches."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._acks_lock = threading.Lock()
            #: Delivery tags handled and not yet acknowledged; a callback is queued while not empty.
            self._acks: list[int] = []

        def __next__(self) -> Any:
            message = super().__next__()
            if message is not None:
                message._delivered_by = self
            return message

        def _ours(self, message: Any, what: str) -> bool:
            """Whether this consumer delivered ``message``. Dramatiq acks through whichever consumer
            its thread holds now: after a restart, a message of the closed channel reaches the new
            one, whose delivery tags start at 1 again, and its tag could name another message there
            (acked unhandled: lost). RabbitMQ has already requeued it with its channel."""
            if getattr(message, "_delivered_by", self) is self:
                return True
            log.warning("not %sing message %s: its channel has closed since (RabbitMQ requeued it)",
                        what, message.message_id)
            return False

        def nack(self, message: Any) -> None:
            if self._ours(message, "nack"):
                super().nack(message)

        def ack(self, message: Any) -> None:
            """Dramatiq's ``ack`` (same bookkeeping of known tags, same errors), batched."""
            if not self._ours(message, "ack"):
                return
            try:
                self.known_tags.remove(message._tag)
            except KeyError:
                log.warning("Failed to ack message %s: not in known tags.", message.message_id)
                return
            with self._acks_lock:
                self._acks.append(message._tag)
                if len(self._acks) > 1:
                    return  # the callback queued for the first one acknowledges this one too
            try:
                self.connection.add_callback_threadsafe(self._send_acks)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                self._drop_acks()
                raise ConnectionClosed(exc) from None
            except Exception:
                self._drop_acks()
                log.warning("Failed to ack message %s.", message.message_id, exc_info=True)

        def _drop_acks(self) -> None:
            """The connection is gone: its unacknowledged messages go back to the queue (RabbitMQ
            requeues them), so nothing is left to send; the next ack starts a batch again."""
            with self._acks_lock:
                self._acks = []

        def _send_acks(self) -> None:
            """On the consumer thread: acknowledge every tag listed so far."""
            with self._acks_lock:
                tags, self._acks = self._acks, []
            for tag in tags:
                self.channel.basic_ack(tag)

    return BatchingConsumer
