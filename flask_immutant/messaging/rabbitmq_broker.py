"""Dramatiq's RabbitMQ broker, whose consumers send their acknowledgements in batches.

A worker thread that has handled a message acknowledges it on the consumer's connection, which
only the consumer thread may use: Dramatiq's consumer queues one callback per message there
(``add_callback_threadsafe``), and each one wakes the consumer thread from its poll (a write to
the connection's wake-up socket and a pass of pika's I/O loop) to send one ``basic_ack``.

Here a worker thread lists the delivery tag, and a timer that each delivery arms on the consumer
thread sends the list within :data:`ACK_DELAY`: the tags below every delivery still being
handled go in one ``basic_ack`` with ``multiple``, rejections first. A worker wakes the consumer
only when no timer is armed, when it rejects a message, or when half the prefetch is listed
(RabbitMQ sends nothing past the prefetch, so a full one must not wait for the timer); a closing
consumer sends its lists before its channel closes. Each message is still acknowledged after its
handler returned, and only then; at a steady rate one frame and one pass of the I/O loop serve
every message handled in those 3 ms. The price: a crash in the :data:`ACK_DELAY` after a
handler returned gives that message back (delivery is at least once either way), as JMS's lazy
``DUPS_OK_ACKNOWLEDGE`` mode and HornetQ's batched acknowledgements do.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

log = logging.getLogger("flask_immutant.messaging")

#: Seconds a handled message's acknowledgement may wait for the consumer thread to run anyway.
#: 10 ms saved hardly more CPU and, as long as short handlers' own work, skewed RabbitMQ's spread
#: of a burst over the nodes (up to 39/161 where 3 ms gave 91/109 at worst; bench/README.md).
ACK_DELAY = 0.003


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

        def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> None:
            super().__init__(broker, queue_name, prefetch, timeout)
            #: Guards the lists below and the removal of a settled tag from ``known_tags``.
            self._acks_lock = threading.Lock()
            #: Delivery tags handled and not yet acknowledged, and failed ones not yet rejected.
            self._acks: list[int] = []
            self._nacks: list[int] = []
            #: A callback is queued that sends the lists: a worker needs to queue no other.
            self._waking = False
            #: A timer is armed that sends the lists within ACK_DELAY: a worker need not wake.
            self._timer_armed = False
            #: Waiting acks that wake the consumer at once: RabbitMQ delivers nothing past the
            #: prefetch, so acks held for a delivery that cannot come would stall the queue.
            self._wake_at = max(1, prefetch // 2)

        def __next__(self) -> Any:
            try:
                message = super().__next__()
                if message is not None:
                    message._delivered_by = self
                    self._arm_timer()
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                # as Dramatiq's own __next__ does: its consumer thread restarts the consumer on
                # ConnectionClosed, and logs anything else as an unexpected error
                raise ConnectionClosed(exc) from None
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

        def ack(self, message: Any) -> None:
            """Dramatiq's ``ack`` (same bookkeeping of known tags, same errors), listed."""
            if self._ours(message, "ack"):
                self._settle(message, self._acks)

        def nack(self, message: Any) -> None:
            """Dramatiq's ``nack``, listed too: a rejection must reach RabbitMQ before an ack
            with ``multiple`` could cover its tag."""
            if self._ours(message, "nack"):
                self._settle(message, self._nacks)

        def _nack(self, tag: int) -> None:
            """Dramatiq rejects a delivery it cannot decode with this (on the consumer thread)."""
            with self._acks_lock:
                self._nacks.append(tag)
            self._wake(f"delivery {tag}")

        def _settle(self, message: Any, listed: list[int]) -> None:
            with self._acks_lock:
                try:
                    self.known_tags.remove(message._tag)
                except KeyError:
                    log.warning("Failed to settle message %s: not in known tags.", message.message_id)
                    return
                listed.append(message._tag)
                if self._waking or (self._timer_armed and not self._nacks and len(self._acks) < self._wake_at):
                    return  # sent by the queued callback, or by the consumer within ACK_DELAY
            self._wake(message.message_id)

        def _wake(self, what: str) -> None:
            """Queue a callback that sends the lists on the consumer thread (once at a time)."""
            with self._acks_lock:
                if self._waking:
                    return
                self._waking = True
            try:
                self.connection.add_callback_threadsafe(self._send_acks)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as exc:
                self._drop_acks()
                raise ConnectionClosed(exc) from None
            except Exception:
                # The connection may well be up (a failed write to its wake-up socket): the lists
                # stay for the timer or the next wake-up; dropping them would leave messages
                # unacknowledged, and a dropped rejection could be covered by a multiple ack.
                with self._acks_lock:
                    self._waking = False
                log.warning("Failed to wake the consumer for message %s.", what, exc_info=True)

        def close(self) -> None:
            """Send the lists, then Dramatiq's close (which runs every queued callback first): a
            message handled just before a stop is not given back to the queue."""
            with self._acks_lock:
                self._waking = True
            try:
                self.connection.add_callback_threadsafe(self._send_acks)
            except Exception:  # closed already: RabbitMQ has requeued what was not acknowledged
                self._drop_acks()
            super().close()

        def _drop_acks(self) -> None:
            """The connection is gone: its unacknowledged messages go back to the queue (RabbitMQ
            requeues them), so nothing is left to send; the next ack starts a batch again."""
            with self._acks_lock:
                self._acks, self._nacks = [], []
                self._waking = False

        def _arm_timer(self) -> None:
            """On the consumer thread, after a delivery: its ack waits at most ACK_DELAY."""
            with self._acks_lock:
                if self._timer_armed:
                    return
                self._timer_armed = True
            self.connection.call_later(ACK_DELAY, self._on_timer)

        def _on_timer(self) -> None:
            """On the consumer thread: send the lists; stay armed while acks keep coming."""
            if self._send_acks(disarm=True):
                self._arm_timer()

        def _send_acks(self, disarm: bool = False) -> int:
            """On the consumer thread: reject and acknowledge every tag listed so far; how many.

            Tags below every delivery still being handled are acknowledged by one ``basic_ack``
            with ``multiple``: each delivery below them is settled already or listed here (the
            rejections go first), since settling removes a tag from ``known_tags`` and lists it
            under one lock, and deliveries are numbered in the order the consumer hands them out.
            """
            with self._acks_lock:
                acks, self._acks = self._acks, []
                nacks, self._nacks = self._nacks, []
                self._waking = False
                if disarm:
                    self._timer_armed = False
                floor = min(self.known_tags, default=None)
            for tag in nacks:
                self.channel.basic_nack(tag, requeue=False)
            below = [tag for tag in acks if floor is None or tag < floor]
            if below:
                self.channel.basic_ack(max(below), multiple=True)
            for tag in acks:
                if floor is not None and tag > floor:
                    self.channel.basic_ack(tag)
            return len(acks) + len(nacks)

    return BatchingConsumer
