"""Dramatiq's Redis broker, made to resume at once after an outage and to spread a trickle evenly.

Four changes, all through Dramatiq's extension points (a broker subclass and its
``consumer_class``; tests/test_messaging_units.py holds the contract tests):

- a consumer that lost the store waits for it itself instead of Dramatiq's fixed 3 s restart delay;
- a consumer Dramatiq closes to restart it, or whose thread ends (a queue's last listener went),
  puts its fetched, never handed out batch back;
- an idle consumer waits on its queue's wake list (BLPOP) instead of polling with a backoff, and
  every publish, retry and requeue adds a token there, so Redis hands a trickle of messages to the
  consumer that has waited longest, round the nodes in turn; while messages stream in faster than
  one per fetch, it pauses a few milliseconds between fetches so that each fetches a batch;
- a worker thread that handled a message lists its id, and the consumer thread acknowledges the
  list in one script call before its next fetch, instead of one call per message on the worker.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from ..keys import wake_list
from ..loops import Backoff
from .redis_acks import PendingAcks, ack_set, messages_hash

if TYPE_CHECKING:
    from dramatiq import Message

if TYPE_CHECKING:
    from dramatiq.brokers.redis import RedisBroker

log = logging.getLogger("flask_immutant.messaging")

#: Wake tokens kept per queue (more would only wake idle consumers for nothing).
WAKE_TOKENS = 64
#: Longest wait of an idle consumer for a token, seconds. Long, so waits seldom time out: a
#: consumer whose wait timed out goes to the back of the line. Below the store's socket timeout.
IDLE_WAIT = 3.0
#: Seconds a consumer holding as many messages as its prefetch waits before looking again.
SATURATED_POLL = 0.05


def is_delay_queue(queue_name: str) -> bool:
    """Dramatiq's delay queue of a queue (``dramatiq.common.dq_name``): polled, never woken."""
    return queue_name.endswith(".DQ")


def push_wake_tokens(client: redis.Redis, tokens: dict[str, int]) -> None:
    """Leave ``count`` tokens on each wake list of ``tokens`` (capped). Tokens only wake, so a wake
    key a store writer replaced by another type is skipped here (its consumer repairs it), never
    an error for the publisher or requeuer."""
    pipe = client.pipeline(transaction=False)
    for wake, count in tokens.items():
        pipe.rpush(wake, *["1"] * count)
        pipe.ltrim(wake, -max(WAKE_TOKENS, count), -1)
    pipe.execute(raise_on_error=False)


def wait_for_wake_token(client: redis.Redis, wake: str, timeout: float, release: str | None = None) -> None:
    """BLPOP one token of ``wake`` (or of ``release``: the consumer's runtime is stopping); a key of
    another type (garbage a store writer put there) is deleted, with a warning, so that tokens can
    be left again."""
    keys = [wake] if release is None else [wake, release]
    try:
        client.blpop(keys, timeout=timeout)
    except redis.ResponseError as exc:
        if "WRONGTYPE" not in str(exc):
            raise
        for key in keys:
            kind = client.type(key)
            if kind not in (b"list", b"none", "list", "none"):
                log.warning("wake list %s held another type of value (%s); replaced", key, kind)
                client.delete(key)


#: Longest pause of a consumer before it fetches again while messages stream in, seconds: a
#: pause lets a batch gather, so one fetch serves several messages (Dramatiq's own consumers
#: sleep 5 to 10 ms after a fetch that found nothing, then twice as long each time). Paused
#: only at ``LINGER_RATE`` messages a second or more, where the pause gathers two or more;
#: below, a consumer fetches as soon as a wake token comes, so a trickle has no added latency.
LINGER_MAX = 0.004
#: The batch a pause aims at: at high rates the pause shortens to gather about this many.
LINGER_BATCH = 8
LINGER_RATE = 2 / LINGER_MAX
#: Seconds over which a consumer counts the messages it fetched, for its arrival rate.
RATE_WINDOW = 0.1


class Release(threading.Event):
    """The broker's ``released``: set once the engine stops the consumers; it also sets the events
    that consumers holding their whole prefetch wait on, so those waits end at once too."""

    def __init__(self) -> None:
        super().__init__()
        self._also: weakref.WeakSet[threading.Event] = weakref.WeakSet()
        #: Consumers are made on their own threads while the engine's stop may be setting this.
        self._also_lock = threading.Lock()

    def also_set(self, event: threading.Event) -> None:
        with self._also_lock:
            self._also.add(event)
        if self.is_set():
            event.set()

    def set(self) -> None:
        super().set()
        with self._also_lock:
            events = list(self._also)
        for event in events:
            event.set()


class ArrivalRate:
    """Messages one consumer fetched per second, counted over windows of :data:`RATE_WINDOW`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        self._count = 0
        self.per_second = 0.0

    def observe(self, fetched: int) -> None:
        self._count += fetched
        now = self._clock()
        if now - self._since >= RATE_WINDOW:
            self.per_second = self._count / (now - self._since)
            self._since, self._count = now, 0

    def linger(self) -> float:
        """How long to pause before the next fetch (0: fetch or wait for a token at once)."""
        if self.per_second < LINGER_RATE:
            return 0.0
        return min(LINGER_MAX, LINGER_BATCH / self.per_second)


#: Milliseconds the release list of a stopping runtime lives (its consumers take their tokens at once).
RELEASE_TTL_MS = 60_000
#: Seconds between PINGs of a consumer waiting for the store to come back.
RESUME_POLL = 0.05
#: Pause before a consumer that failed again soon after resuming resumes again (the one
#: :class:`~flask_immutant.loops.Backoff` policy): first, cap (s); a resume that held for
#: ``RESUME_QUICK`` s or more starts over with no pause. The cap bounds how late consumers come
#: back after a promoted primary refused writes for a while (``min-replicas-to-write`` until the
#: other replica re-attached): 1 s made it 1 s.
RESUME_BACKOFF = (0.05, 0.25)
RESUME_QUICK = RESUME_BACKOFF[1] * 2


@functools.cache
def resuming_redis_broker() -> type[RedisBroker]:
    from dramatiq.brokers.redis import RedisBroker

    class ResumingRedisBroker(RedisBroker):
        """Dramatiq's Redis broker whose consumers resume as soon as the store answers again.

        After a broker error Dramatiq's consumer thread sleeps a fixed delay (3 s) and calls
        :meth:`consume` again. Here the delay is zero and ``consume`` waits instead: until the store
        answers a PING (checked every :data:`RESUME_POLL`), and with a growing pause when it keeps
        failing soon after resuming (a store that answers PING but refuses writes)."""

        def __init__(self, *args: Any, release_key: str | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # Dramatiq's is unannotated
            self._resumes: dict[int, tuple[float, Backoff]] = {}
            #: queue -> fetched messages a closed consumer could not put back (the store was away)
            self._stranded: dict[str, list[bytes]] = {}
            #: Set when the worker is stopping: idle consumers poll instead of waiting for a token.
            self.stopping = threading.Event()
            #: Set once the consumer threads are told to stop: a consumer waiting between two polls
            #: ends its wait at once (the engine's stop; Dramatiq's consumers would sleep it out).
            self.released = Release()
            #: The list this runtime's stop pushes to (keys.messaging_release), named by the backend.
            self.release_key = release_key
            #: Handled messages not yet acknowledged in the store (redis_acks.py).
            self.pending_acks = PendingAcks(self)
            self.add_middleware(closing_consumers()())

        @property
        def consumer_class(self) -> type:
            return waking_consumer(super().consumer_class)

        def put_back(self, queue_name: str, fetched: list[bytes]) -> None:
            """Return messages a consumer fetched and never handed out; if the store is away, the
            next consume of the queue (which waits for the store) tries again."""
            try:
                give_back(self, queue_name, fetched)
            except redis.RedisError as exc:
                log.warning("messaging: %d fetched message(s) of %s go back when the store answers (%s)",
                            len(fetched), queue_name, exc)
                self._stranded.setdefault(queue_name, []).extend(fetched)

        def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
            """Dramatiq's own enqueues (a retry, a delayed message coming due) wake a consumer too."""
            enqueued = super().enqueue(message, delay=delay)
            if delay is None:
                push_wake_tokens(self.client, {wake_list(self.namespace, enqueued.queue_name): 1})
            return enqueued

        def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
            thread = threading.current_thread()
            last, backoff = self._resumes.get(thread.ident or 0, (0.0, None))
            if backoff is None:
                backoff = Backoff(*RESUME_BACKOFF, reset_after=RESUME_QUICK)
            held = time.monotonic() - last
            delay = backoff.next_delay(held)  # the first failure after a resume that held: no pause
            if held < RESUME_QUICK:
                time.sleep(delay)
            waited = False
            while getattr(thread, "running", True):  # a Dramatiq ConsumerThread being stopped
                try:
                    self.client.ping()
                    break
                except redis.RedisError as exc:
                    if not waited:
                        log.warning("messaging: consumer of %s waits for the store (%s)", queue_name, exc)
                    waited = True
                    time.sleep(RESUME_POLL)
            if waited:
                log.info("messaging: consumer of %s resumes", queue_name)
            self._resumes[thread.ident or 0] = (time.monotonic(), backoff)
            self.pending_acks.send_or_keep(queue_name)  # else the reaper loop's send_all does it
            self.put_back(queue_name, self._stranded.pop(queue_name, []))
            consumer: Any = super().consume(queue_name, prefetch, 0)  # no sleep in Dramatiq's consumer
            if is_delay_queue(queue_name):  # polled: it must also look at due times regularly
                consumer.poll_ms = timeout
            else:  # waits for a token
                consumer.idle_wait = IDLE_WAIT
            return consumer

    return ResumingRedisBroker


@functools.cache
def closing_consumers() -> type:
    """The middleware that closes a consumer when its consumer thread ends (made on first use, as
    the broker class is)."""
    from dramatiq import Middleware

    class ClosingConsumers(Middleware):
        """Close a consumer once its thread ends, as Dramatiq's worker does only at its own stop.

        The engine stops a queue's consumer thread when its last listener goes (``Engine.unbind``);
        its consumer would keep the acks its workers list afterwards, and its fetched, never handed
        out batch, until the worker stopped (or for good, when the queue is bound again). Closing
        it sends and puts those back, and workers still finishing acknowledge on their own thread.
        A second close (the worker's stop) finds nothing left to do."""

        def before_consumer_thread_shutdown(self, broker: Any, thread: Any) -> None:
            try:
                thread.close()  # puts its delayed messages back, then closes the consumer
            finally:  # a failed put-back (the store away) skipped the consumer's close
                if thread.consumer is not None:
                    thread.consumer.close()

    return ClosingConsumers


@functools.cache
def waking_consumer(base: type) -> type:
    class WakingConsumer(base):  # type: ignore[misc]  # a base chosen at run time is Any to mypy
        """Dramatiq's Redis consumer, which on an empty queue waits on the queue's wake list
        instead of polling with a backoff.

        Polling hands a message to whichever consumer happens to poll first, and a consumer that
        just got one polls densely for a while, so a steady trickle clusters on a few nodes. Redis
        gives each token to the consumer that has blocked longest, so a trickle goes round the
        consumers in turn, as RabbitMQ does. ``idle_wait`` (seconds) bounds a wait, so messages
        that came without a token (the reaper's requeues) are still fetched.

        A fetch that returns fewer messages than it asked for has emptied the queue. Then the
        consumer clears the queue's tokens (each is a message already fetched: else it would wake
        once for each and fetch nothing) and waits for a token; or, while messages come at
        :data:`LINGER_RATE` a second or more, it pauses up to :data:`LINGER_MAX` and fetches
        again, so that one round trip fetches several messages where one per message would take
        the CPU the publishers and handlers need (about a fetch per message before, 0.1 to 0.2 now
        at 1,500 a second: bench/README.md, issue 14). A fetch that filled the prefetch is
        followed by the next as soon as an ack makes room.

        A worker thread that handled a message lists its id (redis_acks.py), and the consumer
        thread acknowledges the list in one script call before it fetches again. Its waits with a
        list pending are short (a linger, or a saturated consumer's wait for room, which the ack
        itself ends); before a wait for a wake token, and once closed, it sends the list, and
        during that wait, or after the close, a worker sends it itself. A list the store refused
        stays for the next sender (the engine's reaper loop sends leftovers). As on RabbitMQ
        (rabbitmq_broker.py), a crash after a handler returned and before the list went out gives
        that message back: delivery is at least once either way.

        A delay queue's consumer (``poll_ms``) polls with Dramatiq's backoff instead, and every
        wait between polls ends once the broker is ``released`` (the engine stops), so a stop
        never sleeps out a poll interval; its workers acknowledge directly (its waits are long)."""

        idle_wait: float | None = None
        poll_ms: int | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            from .. import lua

            super().__init__(*args, **kwargs)
            #: The last fetch left the queue empty (it returned less than it asked for).
            self._drained = False
            #: How many messages the last fetch returned.
            self._fetched = 0
            self._misses = 0
            self._arrivals = ArrivalRate()
            #: Set by each ack or nack (worker threads) and by the broker's release: a consumer
            #: holding its whole prefetch fetches again as soon as there is room.
            self._room = threading.Event()
            self.broker.released.also_set(self._room)
            self._acks: PendingAcks = self.broker.pending_acks
            #: The consumer thread waits for a wake token (listed acks would wait up to
            #: ``idle_wait``), or the consumer is closed: a worker sends the list itself. Each is
            #: set before the consumer's last send takes the list, and a worker reads it after
            #: listing its ack; both steps take the list's lock, which orders them, so every ack is
            #: in that send or sent by its worker.
            self._waiting = False
            self._closed = False
            self._clear_stale_tokens = lua.script(self.broker.client, "messaging/redis_broker_idle")

        def __next__(self) -> Any:
            if self.idle_wait is not None and not self.message_cache:
                if self.outstanding_message_count >= self.prefetch:
                    # busy: leave the tokens to consumers that can fetch, until an ack makes room
                    self._room.clear()
                    if self.outstanding_message_count >= self.prefetch and not self.broker.released.is_set():
                        self._room.wait(SATURATED_POLL)  # no ack since the look above: wait for one
                elif self.broker.stopping.is_set():
                    # Dramatiq tells consumers to stop only once its workers are done, and a
                    # consumer waiting for a token would hold the stop up by up to ``idle_wait``
                    self.broker.released.wait(SATURATED_POLL)
                elif self._drained:
                    linger = self._arrivals.linger() if self._fetched else 0.0
                    if linger:
                        self.broker.released.wait(linger)
                    else:
                        self._wait_for_work()
                # else: the last fetch filled the prefetch: fetch again as soon as there is room,
                # without a token, as a backlog holds more messages than tokens
            if not self.message_cache and self._acks.listed(self.queue_name):
                self._send_acks()
            room = 0 if self.message_cache else self.prefetch - self.outstanding_message_count
            message = super().__next__()
            if room > 0:  # this call fetched
                self._fetched = 0 if message is None else 1 + len(self.message_cache)
                self._drained = self._fetched < room
                self._arrivals.observe(self._fetched)
            if message is not None:
                self._misses = 0
            elif self.poll_ms is not None:
                from dramatiq.common import compute_backoff

                self._misses, backoff_ms = compute_backoff(self._misses, max_backoff=self.poll_ms)
                self.broker.released.wait(backoff_ms / 1000)
            return message

        def ack(self, message: Any) -> None:
            """Dramatiq's ``ack`` (the same bookkeeping), listed: sent by the consumer thread, or
            at once when it waits for a token or is closed. Never raises: an ack the store refused
            stays listed (Dramatiq's worker thread would retry a connection error every few
            seconds, and drop a refusal such as READONLY)."""
            self._acks.add(self.queue_name, message.options.get("redis_message_id", ""))
            self.queued_message_ids.discard(message.message_id)
            self._room.set()
            if self._waiting or self._closed or self.poll_ms is not None:
                self._acks.send_or_keep(self.queue_name)

        def _send_acks(self) -> None:
            """On the consumer thread: acknowledge what is listed (kept on an error). A lost store
            restarts the consumer, as Dramatiq's fetch would; a refusal (READONLY) is left to the
            fetch to report."""
            try:
                self._acks.send(self.queue_name)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                from dramatiq.errors import ConnectionClosed

                raise ConnectionClosed(exc) from None
            except redis.RedisError:
                pass  # kept, and warned about once

        def nack(self, message: Any) -> None:
            try:
                super().nack(message)
            finally:
                self._room.set()

        def _wait_for_work(self) -> None:
            """Clear the stale tokens of an empty queue, then wait for the next publish's token."""
            wake = wake_list(self.broker.namespace, self.queue_name)
            self._waiting = True
            try:
                self._send_acks()
                if self._clear_stale_tokens(keys=[f"{self.broker.namespace}:{self.queue_name}", wake]):
                    return  # messages came since the fetch: fetch them
                if not self.broker.stopping.is_set():
                    # The stop sets ``stopping``, then pushes to the release list, which only this
                    # runtime's consumers read: a stop after the look above still ends this wait.
                    wait_for_wake_token(self.broker.client, wake, self.idle_wait or 0, self.broker.release_key)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                from dramatiq.errors import ConnectionClosed

                raise ConnectionClosed(exc) from None
            finally:
                self._waiting = False

        def close(self) -> None:
            """Send the listed acks, then put back what was fetched and never handed out: after an
            error Dramatiq's consumer thread makes a new consumer, and this one's batch would wait
            in its ack set (our heartbeat alive, so no reaper takes it) until the node leaves."""
            self._closed = True  # a worker still finishing sends its own ack
            self._acks.send_or_keep(self.queue_name)  # before the put-back, which goes by the ack set
            cached: list[bytes] = [data for data in self.message_cache if data is not None]
            self.message_cache.clear()
            self.broker.put_back(self.queue_name, cached)
            super().close()

        def requeue(self, messages: Any) -> None:
            messages = list(messages)
            super().requeue(messages)
            if messages and not is_delay_queue(self.queue_name):  # polled, not woken
                push_wake_tokens(self.broker.client, {wake_list(self.broker.namespace, self.queue_name): len(messages)})

    return WakingConsumer


def fetched_ids(broker: Any, queue_name: str, fetched: list[bytes]) -> list[str]:
    """The broker's ids of messages this broker fetched from ``queue_name`` and holds unacknowledged,
    found by their bytes (an undecodable message cannot say its id); handled ones whose ack is
    still listed are not among them."""
    if not fetched:
        return []
    unacknowledged = set(broker.client.smembers(ack_set(broker, queue_name)))
    pending = getattr(broker, "pending_acks", None)  # read after: an id listed meanwhile is skipped
    handled = {message_id.encode() for message_id in pending.unsent(queue_name)} if pending else set()
    ids = sorted(unacknowledged - handled)
    if not ids:
        return []
    wanted = Counter(fetched)
    found = []
    for redis_id, data in zip(ids, broker.client.hmget(messages_hash(broker, queue_name), ids), strict=True):
        if wanted[data] > 0:
            wanted[data] -= 1
            found.append(redis_id.decode() if isinstance(redis_id, bytes) else str(redis_id))
    return found


def give_back(broker: Any, queue_name: str, fetched: list[bytes]) -> None:
    """Return fetched, unacknowledged messages to their queue and wake a consumer for each
    (Dramatiq's requeue only moves ids still in our ack set, so a reaped one is not doubled)."""
    ids = fetched_ids(broker, queue_name, fetched)
    if ids:
        broker.do_requeue(queue_name, *ids)
    if ids and not is_delay_queue(queue_name):  # polled, not woken
        push_wake_tokens(broker.client, {wake_list(broker.namespace, queue_name): len(ids)})
