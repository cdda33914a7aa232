"""Messaging pieces without processes: names, the envelope, selectors, settings, publish errors."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from types import SimpleNamespace

import pytest
from flask import Flask

from flask_immutant import ImmutantConfigError, ImmutantExtension, ImmutantState, get_state
from flask_immutant.messaging import EncodeError, MessagingError, listen, messaging_for, publish
from flask_immutant.messaging.codec import decode, envelope
from flask_immutant.messaging.destination import Destination
from flask_immutant.messaging.errors import MalformedMessage
from flask_immutant.messaging.selector import compile_selector


def test_destination_kinds_come_from_the_name_or_kind() -> None:
    assert Destination.parse("/queue/msg", "c").kind == "queue"
    assert Destination.parse("/topic/news", "c").kind == "topic"
    assert Destination.parse("orders", "c", kind="queue").queue_name == "c.q.orders"
    with pytest.raises(MessagingError, match="queue or a topic"):
        Destination.parse("orders", "c")
    with pytest.raises(MessagingError, match="kind='nope'"):
        Destination.parse("orders", "c", kind="nope")


def test_unsafe_names_map_to_distinct_dramatiq_queues() -> None:
    a = Destination.parse("/queue/a b", "c").queue_name
    b = Destination.parse("/queue/a_b", "c").queue_name
    assert a != b and " " not in a


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_envelope_round_trip(encoding: str) -> None:
    data = envelope("/queue/x", {"a": [1, 2]}, encoding=encoding, properties={"p": 1}, key="k", ttl=5)
    message = decode(data)
    assert message.body == {"a": [1, 2]} and message.properties == {"p": 1} and message.key == "k"
    assert not message.expired


@pytest.mark.parametrize("data", [
    envelope("/queue/x", {"a": 1}),
    envelope("/topic/y", [1, "b"], encoding="msgpack", properties={"p": 1}, correlation_id="c", reply_to="r",
             key="k", ttl=5, trace={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}),
    {"destination": "/queue/x", "body": None, "published_at": 7, "expires_at": 9, "trace": {"baggage": 1}},
    {"destination": "/queue/x", "body": 1},
])
def test_decode_gives_the_message_its_constructor_would(data: dict[str, object]) -> None:
    """decode fills a Message without its __init__ (for speed): every field set, the same values, and
    still frozen."""
    import dataclasses

    from flask_immutant.messaging.codec import Message

    message = decode(data, retries=2, message_id="m")
    assert list(vars(message)) == [f.name for f in dataclasses.fields(Message)]
    assert message == Message(**vars(message)) and repr(message) == repr(Message(**vars(message)))
    assert message.retries == 2 and message.id == "m" and message.destination == data["destination"]
    assert isinstance(message.published_at, float) or "published_at" not in data
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.body = "changed"  # type: ignore[misc]  # what the test checks
    assert dataclasses.replace(message, retries=3).retries == 3


@pytest.mark.parametrize("field", ["published_at", "expires_at"])
def test_an_envelope_with_a_time_that_is_not_a_number_is_malformed(field: str) -> None:
    with pytest.raises(MalformedMessage, match="expected a number"):
        decode({"destination": "/queue/x", "body": 1, field: "soon"})
    with pytest.raises(MalformedMessage, match="expected a number"):
        decode({"destination": "/queue/x", "body": 1, field: True})


def test_message_ids_are_uuid4_strings() -> None:
    import uuid

    from flask_immutant.messaging.codec import new_id

    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # the variant's two free bits come from the random bytes: all four characters occur
    assert {text[19] for text in ids} == set("89ab")


def test_contract_dramatiq_message_proxy_keeps_its_message() -> None:
    """The engine and the consumer guard read a message's fields from the Dramatiq ``Message`` a
    ``MessageProxy`` wraps (undecodable.fields_of), not through its slow ``__getattr__``."""
    from dramatiq import Message
    from dramatiq.broker import MessageProxy

    from flask_immutant.messaging.undecodable import fields_of

    message: Message[object] = Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={"retries": 1})
    assert fields_of(MessageProxy(message)) is message
    assert fields_of(message) is message
    assert fields_of(SimpleNamespace(options={}, message_id="i")).message_id == "i"


def test_a_msgpack_body_that_cannot_be_encoded_fails_at_once() -> None:
    with pytest.raises(EncodeError, match="msgpack"):
        envelope("/queue/x", object(), encoding="msgpack")


@pytest.mark.parametrize("raw", [None, "text", {"destination": "/queue/x"},
                                 {"destination": "/queue/x", "body": "!!", "encoding": "msgpack"},
                                 {"destination": "/queue/x", "body": 1, "encoding": "pickle"}])
def test_malformed_envelopes_are_refused(raw: object) -> None:
    with pytest.raises(MalformedMessage):
        decode(raw)


@pytest.mark.parametrize(("data", "reason"), [
    (b"\xff\xfe garbage", "UnicodeDecodeError"),
    (b"not json", "JSONDecodeError"),
    (b"[1, 2]", "a JSON list"),
    (b'{"queue_name": "q"}', "missing"),
    (b'{"queue_name": "q", "actor_name": "a", "args": {}, "kwargs": {}, "options": {}, "message_id": "i",'
     b' "message_timestamp": 1}', "args is a dict"),
    (b'{"queue_name": "q", "actor_name": "a", "args": [], "kwargs": {}, "options": {}, "message_id": "i",'
     b' "message_timestamp": true}', "message_timestamp is a bool"),
])
def test_the_tolerant_encoder_turns_garbage_into_a_stand_in_with_the_reason(data: bytes, reason: str) -> None:
    from dramatiq.encoder import JSONEncoder

    from flask_immutant.messaging.undecodable import UNDECODABLE, TolerantEncoder

    fields = TolerantEncoder(JSONEncoder()).decode(data)
    assert reason in fields["options"][UNDECODABLE]
    assert fields["actor_name"] == "" and fields["args"] == []


def test_the_tolerant_encoder_keeps_the_wire_format() -> None:
    from dramatiq import Message
    from dramatiq.encoder import JSONEncoder

    from flask_immutant.messaging.undecodable import TolerantEncoder

    message: Message[object] = Message(queue_name="q", actor_name="a", args=(1, {"é": [0.1, None, "€\n"]}),
                                       kwargs={}, options={"x": 1, "nan": float("nan")})
    plain, tolerant = JSONEncoder(), TolerantEncoder(JSONEncoder())  # the tolerant one encodes by itself
    encoded = plain.encode(message.asdict())
    assert tolerant.encode(message.asdict()) == encoded
    assert tolerant.decode(encoded) == plain.decode(encoded)


@pytest.mark.parametrize(("expression", "properties", "expected"), [
    ("priority >= 5", {"priority": 7}, True),
    ("priority >= 5", {"priority": 2}, False),
    ("priority >= 5", {}, False),
    ("region in ('eu', 'us') and not urgent", {"region": "eu", "urgent": False}, True),
    ("region == 'eu' or x < -1", {"region": "us", "x": -3}, True),
    ("1 < n < 3", {"n": 2}, True),
])
def test_selector_expressions(expression: str, properties: dict[str, object], expected: bool) -> None:
    selector = compile_selector(expression)
    assert selector is not None and selector(properties) is expected


@pytest.mark.parametrize("expression", ["__import__('os')", "a.b == 1", "x[0] == 1", "a is None", "a ===",
                                        "x == -'a'", "x == -None"])  # a negated string was a TypeError
def test_unsafe_or_invalid_selectors_are_refused(expression: str) -> None:
    with pytest.raises(MessagingError, match="selector"):
        compile_selector(expression)


def test_broker_url_is_validated() -> None:
    with pytest.raises(ImmutantConfigError, match="IMMUTANT_BROKER_URL"):
        ImmutantState.build({"IMMUTANT_BROKER_URL": "kafka://x"}, environ={})
    state = ImmutantState.build({"IMMUTANT_BROKER_URL": "amqp://guest:guest@localhost/"}, environ={})
    assert state.settings["IMMUTANT_BROKER_URL"].startswith("amqp://")


def test_messaging_can_be_switched_off() -> None:
    app = Flask("off")
    app.config["IMMUTANT_MESSAGING"] = False
    ImmutantExtension(app)
    with pytest.raises(MessagingError, match="switched off"):
        messaging_for(app)


def test_listening_at_import_time_only_registers(store_client) -> None:
    # Given an app that listens at module level, outside any app runtime
    app = Flask("importing")
    ImmutantExtension(app)
    listener = listen("/queue/imported", lambda body: None, app=app)
    # Then nothing consumes: no engine, no consumer in the store
    messaging = messaging_for(app)
    assert messaging.engine is None and messaging.listeners == [listener]
    assert listener.queue is None
    # And the listener handle calls its handler, so @listen leaves functions usable
    assert listener("x") is None
    listener.stop()
    assert messaging.listeners == []


def test_the_consumer_is_named_for_the_node_the_settings_name(embedded_store, immutant_home, cluster_name,
                                                             monkeypatch) -> None:
    # Given a node name that only the app's settings give (no IMMUTANT_NODE_NAME in the environment)
    monkeypatch.delenv("IMMUTANT_NODE_NAME", raising=False)
    app = Flask("named")
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name,
                      IMMUTANT_NODE_NAME="settings-node")
    ImmutantExtension(app)
    state = get_state(app)
    messaging = messaging_for(app)
    # When the messaging engine starts in this process, as in an app runtime, and beats once
    runtime = SimpleNamespace(app=app, settings=state.settings)  # what runtime_started/stopping read
    messaging.runtime_started(runtime)  # type: ignore[arg-type]
    try:
        engine = messaging.engine
        assert engine is not None
        engine.beat()
        record = json.loads(state.store.get(state.keys.messaging_consumer(engine.consumer_id)))
    finally:
        messaging.runtime_stopping(runtime)  # type: ignore[arg-type]
        state.store.close()
    # Then the consumer and its heartbeat carry the node's one name (state.node_name), not "local"
    assert engine.consumer_id.startswith("settings-node.")
    assert record["node"] == "settings-node" == state.node_name


def test_a_message_that_cannot_be_encoded_fails_at_publish(embedded_store, immutant_home, cluster_name) -> None:
    app = Flask("pub")
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name)
    ImmutantExtension(app)
    with app.app_context(), pytest.raises(EncodeError, match="JSON"):
        publish("/queue/x", {"when": object()})
    with pytest.raises(MessagingError, match="priority"):
        publish("/queue/x", 1, priority=12, app=app)
    app.extensions["immutant"].store.close()


@pytest.mark.parametrize("field", ["published_at", "expires_at"])
@pytest.mark.parametrize("value", [10**400, float("nan"), float("inf"), float("-inf"), True, "1"])
def test_an_envelope_time_that_is_no_finite_number_is_malformed(field: str, value: object) -> None:
    """Regression (review): JSON lets a 400-digit integer and NaN through; the integer raised
    OverflowError, retried like a failing handler instead of dead-lettered at once, and a NaN
    expiry never expired."""
    data = envelope("/queue/x", {"a": 1})
    data[field] = value
    with pytest.raises(MalformedMessage, match="malformed envelope"):
        decode(data)


@pytest.mark.parametrize("raw", [b"\xff not json", b"[1]", b'{"ok": true}', b"null"])
def test_a_malformed_reply_is_a_remote_error_not_a_crash(raw: bytes) -> None:
    from flask_immutant.messaging.core import _reply

    ok, error = _reply(raw)
    assert not ok and "malformed reply" in error


def test_contract_dramatiq_consumer_restart_delay_and_running_flag() -> None:
    """The Redis broker's consumers resume on their own (redis_broker.resuming_redis_broker): that relies
    on Dramatiq reading its restart delay from this module global at each restart, and on its
    consumer threads saying whether they still run."""
    import inspect

    import dramatiq.worker

    assert isinstance(dramatiq.worker.CONSUMER_RESTART_DELAY_SECS, (int, float))
    source = inspect.getsource(dramatiq.worker.ConsumerThread.run)
    assert "time.sleep(CONSUMER_RESTART_DELAY_SECS)" in source and "self.broker.consume(" in source
    # ... and on it closing the old consumer first (whose close puts its fetched batch back)
    assert "self.close()" in source
    assert "self.consumer.close()" in inspect.getsource(dramatiq.worker.ConsumerThread.close)
    assert "self.running = False" in inspect.getsource(dramatiq.worker.ConsumerThread.stop)


def test_contract_dramatiq_redis_consumer_hooks() -> None:
    """redis_broker.waking_consumer subclasses whatever ``RedisBroker.consumer_class`` gives, reads its
    message cache and prefetch counts, and relies on a zero ``timeout`` meaning "no backoff sleep"."""
    import inspect

    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.common import compute_backoff

    assert "self.consumer_class(" in inspect.getsource(RedisBroker.consume)
    consumer_source = inspect.getsource(RedisBroker.consumer_class.fget(None))  # type: ignore[union-attr]
    for name in ("self.message_cache", "def outstanding_message_count", "self.prefetch",
                 "compute_backoff(self.misses, max_backoff=self.timeout)", "def requeue"):
        assert name in consumer_source, name
    assert all(compute_backoff(misses, max_backoff=0)[1] == 0 for misses in range(40))


def test_contract_dramatiq_worker_threads_for_the_engine_stop() -> None:
    """The engine stops Dramatiq's worker threads, then its consumer threads, itself before
    ``Worker.stop`` (engine.Engine._release_worker): that relies on the worker keeping both lists
    and on each thread's ``stop`` only asking it to stop."""
    import inspect

    import dramatiq.worker

    init = inspect.getsource(dramatiq.worker.Worker.__init__)
    assert "self.workers" in init and "self.consumers" in init
    for thread in (dramatiq.worker.WorkerThread, dramatiq.worker.ConsumerThread):
        assert "self.running = False" in inspect.getsource(thread.stop)


def test_a_delay_queue_consumer_stops_waiting_between_polls_once_released(store_client, cluster_name) -> None:
    """Regression: a delay queue's consumer slept Dramatiq's backoff between two polls (up to the
    worker timeout, 0.5 s at the default failure timeout) and Dramatiq stops a consumer thread only
    between polls, so most of a runtime's stop was that sleep. Forty idle polls back off to most of
    an hour each here; pytest-timeout fails a consumer that sleeps them out."""
    from flask_immutant.keys import Keys
    from flask_immutant.messaging.backends import RedisBackend

    # Given an idle delay queue's consumer polling with up to an hour between two polls
    backend = RedisBackend(store_client, Keys(cluster_name))
    broker = backend.make_broker([], consumer_id=f"{cluster_name}.consumer")
    consumer = broker.consume(f"{cluster_name}.q.idle.DQ", prefetch=1, timeout=3_600_000)
    polls: list[object] = []
    poller = threading.Thread(target=lambda: polls.extend(next(consumer) for _ in range(40)), daemon=True)
    poller.start()
    # When the engine stopping it releases the broker's consumers
    broker.released.set()
    # Then every poll left comes at once, each finding nothing
    poller.join()
    assert polls == [None] * 40


def _guarded_consumer_of(store_client, cluster_name: str, name: str, garbage: dict[str, bytes]):
    """A guarded consumer (as the engine makes them) of a new queue holding ``garbage`` entries
    (id -> bytes) ahead of one good message; returns (backend, broker, queue, dead-letter records,
    the good actor, the consumer)."""
    import dramatiq

    from flask_immutant.keys import Keys
    from flask_immutant.messaging.backends import RedisBackend, Target
    from flask_immutant.messaging.undecodable import guard_consumers

    backend = RedisBackend(store_client, Keys(cluster_name))
    broker = backend.make_broker([], consumer_id=f"{cluster_name}.consumer")
    dead: list[tuple[object, ...]] = []
    guard_consumers(broker, lambda *record: dead.append(record))
    queue = f"{cluster_name}.q.{name}"
    good = dramatiq.actor(lambda: None, broker=broker, queue_name=queue, actor_name=f"{cluster_name}_{name}")
    for garbage_id, data in garbage.items():
        store_client.hset(f"{backend.namespace}:{queue}.msgs", garbage_id, data)
        store_client.rpush(f"{backend.namespace}:{queue}", garbage_id)
    backend.publish(broker, [Target(good.message())], None)
    return backend, broker, queue, dead, good, broker.consume(queue, prefetch=8, timeout=100)


def test_the_guard_acks_undecodable_messages_on_the_broker_the_redis_backend_makes(store_client, cluster_name) -> None:
    """Regression: the guard knew Dramatiq's Redis broker by its module, so on our subclass (which
    the Redis backend makes) an undecodable message got no broker id: acking it raised, and the
    consumer thread restarted with the rest of its fetched batch stranded in its ack set."""
    from support import wait_until

    # Given the broker a node's engine consumes with, guarded, and garbage ahead of a good message
    backend, broker, queue, dead, good, consumer = _guarded_consumer_of(
        store_client, cluster_name, "guarded", {"garbage-id": b"\xff garbage"})
    # When its consumer fetches both
    message = wait_until(lambda: next(consumer), timeout=10)
    # Then the good message is delivered, the garbage is dead-lettered with its bytes and acknowledged
    assert message.actor_name == good.actor_name
    assert [(q, raw) for q, _, _, raw, _ in dead] == [(queue, b"\xff garbage")], dead
    assert "not a Dramatiq message" in str(dead[0][2])
    # (acknowledged in one call with the good one's: acks go out before a fetch or at the close)
    consumer.ack(message)
    consumer.close()
    assert not store_client.exists(f"{backend.namespace}:__acks__.{broker.broker_id}.{queue}")
    assert not store_client.exists(f"{backend.namespace}:{queue}.msgs")


def test_two_garbage_messages_with_the_same_bytes_are_each_dead_lettered_once(store_client, cluster_name) -> None:
    """Regression (review of the batched acks): an undecodable message is found by its bytes in the
    ack set, where the first one's id stayed until its listed ack went out; the second was taken
    for it, dead-lettered twice, and its own id never acknowledged (it ran again once the node left)."""
    from support import wait_until

    # Given two garbage entries with the same bytes ahead of a good message
    backend, broker, queue, dead, _, consumer = _guarded_consumer_of(
        store_client, cluster_name, "twins", {"g1": b"\xff the same garbage", "g2": b"\xff the same garbage"})
    # When a consumer fetches all three, and the good one is handled
    message = wait_until(lambda: next(consumer), timeout=10)
    consumer.ack(message)
    consumer.close()
    # Then each garbage entry was dead-lettered once, and nothing is left unacknowledged
    assert [raw for _, _, _, raw, _ in dead] == [b"\xff the same garbage"] * 2
    assert not store_client.exists(f"{backend.namespace}:__acks__.{broker.broker_id}.{queue}")
    assert not store_client.exists(f"{backend.namespace}:{queue}.msgs")


def test_a_closing_redis_consumer_acknowledges_before_it_puts_back(store_client, cluster_name) -> None:
    """Regression (review of the batched acks): the close put back its fetched batch, found by
    bytes in the ack set, before it sent its listed acks; with a copy of a handled message's bytes
    in the batch (a store writer's), the handled one went back to the queue and ran again, and the
    copy stayed unacknowledged."""
    backend, broker, queue, _, consumer = _redis_consumer_of(store_client, cluster_name, "copy", 1, 8)
    original = store_client.lindex(f"{backend.namespace}:{queue}", 0).decode()
    data = store_client.hget(f"{backend.namespace}:{queue}.msgs", original)
    store_client.hset(f"{backend.namespace}:{queue}.msgs", "zzzz-copy", data)
    store_client.rpush(f"{backend.namespace}:{queue}", "zzzz-copy")
    # Given the original handled, and its copy fetched but not handed out
    message = next(consumer)
    assert message.options["redis_message_id"] == original and len(consumer.message_cache) == 1
    consumer.ack(message)
    # When the consumer closes
    consumer.close()
    # Then the original is acknowledged and the copy is back in the queue
    assert store_client.lrange(f"{backend.namespace}:{queue}", 0, -1) == [b"zzzz-copy"]
    assert not store_client.exists(f"{backend.namespace}:__acks__.{broker.broker_id}.{queue}")


def test_a_closed_redis_consumer_puts_back_what_it_fetched_and_never_handed_out(store_client, cluster_name) -> None:
    """Regression: after a consumer error Dramatiq's consumer thread closes the consumer and makes a
    new one; the old one's fetched batch stayed in its ack set (our heartbeat alive, so no reaper
    took it) until the node left."""
    import dramatiq

    from flask_immutant.keys import Keys
    from flask_immutant.messaging.backends import RedisBackend, Target

    from support import wait_until

    # Given a consumer that fetched three messages and handed out one
    backend = RedisBackend(store_client, Keys(cluster_name))
    broker = backend.make_broker([], consumer_id=f"{cluster_name}.consumer")
    queue = f"{cluster_name}.q.batch"
    actor = dramatiq.actor(lambda n: None, broker=broker, queue_name=queue, actor_name=f"{cluster_name}_n")
    backend.publish(broker, [Target(actor.message(n)) for n in range(3)], None)
    consumer = broker.consume(queue, prefetch=3, timeout=100)
    first = wait_until(lambda: next(consumer), timeout=10)
    acks = f"{backend.namespace}:__acks__.{broker.broker_id}.{queue}"
    assert store_client.scard(acks) == 3
    # When it is closed (as Dramatiq's consumer thread does before it makes a new one)
    consumer.close()
    # Then only the handed-out message stays unacknowledged; the other two wait in the queue again
    assert store_client.smembers(acks) == {first.options["redis_message_id"].encode()}
    assert store_client.llen(f"{backend.namespace}:{queue}") == 2
    # And the next consumer delivers them, so none is lost or doubled
    fresh = broker.consume(queue, prefetch=3, timeout=100)
    rest = [wait_until(lambda: next(fresh), timeout=10) for _ in range(2)]
    assert sorted(m.args[0] for m in [first, *rest]) == [0, 1, 2]


def test_a_saturated_redis_consumer_fetches_again_as_soon_as_it_has_room(store_client, cluster_name) -> None:
    """Regression: a consumer whose prefetch was full took the empty fetch for an empty queue, and once
    acks made room it waited for a wake token; with the backlog's tokens used up (the list holds 64)
    it fetched one batch per idle wait (3 s), so the end of a backlog of 5000 drained at 5 a second."""
    import dramatiq

    from flask_immutant.keys import Keys
    from flask_immutant.messaging.backends import RedisBackend, Target

    from support import wait_until

    # Given a backlog with no wake token left, and a consumer holding as many messages as its prefetch
    backend = RedisBackend(store_client, Keys(cluster_name))
    broker = backend.make_broker([], consumer_id=f"{cluster_name}.consumer")
    queue = f"{cluster_name}.q.backlog"
    actor = dramatiq.actor(lambda n: None, broker=broker, queue_name=queue, actor_name=f"{cluster_name}_n")
    backend.publish(broker, [Target(actor.message(n)) for n in range(5)], None)
    store_client.delete(backend.keys.messaging_wake(queue))
    consumer = broker.consume(queue, prefetch=2, timeout=100)
    consumer.idle_wait = 60.0  # a wait for a token would outlast the deadline below
    held = [wait_until(lambda: next(consumer), timeout=10) for _ in range(2)]
    assert next(consumer) is None  # full: nothing fetched
    # When it acknowledges what it holds
    for message in held:
        consumer.ack(message)
    # Then its next call fetches from the backlog at once, without a token
    fetched: list[object] = []
    caller = threading.Thread(target=lambda: fetched.append(next(consumer)), daemon=True)
    caller.start()
    caller.join(timeout=15)
    assert not caller.is_alive(), "the consumer waited for a wake token with messages in its queue"
    assert fetched and fetched[0] is not None


def _redis_consumer_of(store_client, cluster_name: str, name: str, messages: int, prefetch: int):
    """A consumer (as the engine makes them) of a new queue holding ``messages`` published ones."""
    import dramatiq

    from flask_immutant.keys import Keys
    from flask_immutant.messaging.backends import RedisBackend, Target

    backend = RedisBackend(store_client, Keys(cluster_name))
    broker = backend.make_broker([], consumer_id=f"{cluster_name}.consumer")
    queue = f"{cluster_name}.q.{name}"
    actor = dramatiq.actor(lambda n: None, broker=broker, queue_name=queue, actor_name=f"{cluster_name}_{name}")
    if messages:
        backend.publish_many(broker, [([Target(actor.message(n))], None) for n in range(messages)])
    consumer = broker.consume(queue, prefetch=prefetch, timeout=100)
    return backend, broker, queue, actor, consumer


def test_a_redis_consumer_that_emptied_its_queue_waits_for_the_next_publish_not_for_stale_tokens(
        store_client, cluster_name) -> None:
    """Regression: every publish leaves a wake token, and one fetch took several messages; the consumer
    then woke once for each token left, and each time fetched nothing (a round trip each, taken
    from the CPU the publishers and handlers share: issue 14)."""
    from flask_immutant.messaging.backends import Target

    from support import wait_until

    # Given a consumer that took, in one fetch, all five messages of its queue (five tokens left)
    backend, broker, queue, actor, consumer = _redis_consumer_of(store_client, cluster_name, "stale", 5, 8)
    fetches = []
    fetch = broker.do_fetch
    broker.do_fetch = lambda *args: fetches.append(args) or fetch(*args)
    consumer.idle_wait = 60.0
    taken = [next(consumer) for _ in range(5)]
    assert all(m is not None for m in taken) and len(fetches) == 1
    # When its consumer thread asks it for more (as Dramatiq's loop does, again and again)
    got: list[object] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            message = next(consumer)
            if message is not None:
                got.append(message)
                return

    caller = threading.Thread(target=consume, daemon=True)
    caller.start()
    try:
        # Then it waits on the wake list, the tokens of the messages it took gone, without fetching
        wait_until(lambda: store_client.llen(backend.keys.messaging_wake(queue)) == 0, timeout=10)
        time.sleep(0.3)
        assert len(fetches) == 1, f"{len(fetches) - 1} fetch(es) for stale tokens"
        # And the next publish wakes it, for one fetch
        backend.publish(broker, [Target(actor.message(5))], None)
        caller.join(timeout=15)
        assert not caller.is_alive(), "the consumer did not wake for the new message"
        assert len(fetches) == 2 and got[0].args == (5,)  # type: ignore[attr-defined]
    finally:
        stop.set()
        broker.stopping.set()
        backend.wake(broker, [queue])
        caller.join(timeout=15)


def test_a_redis_consumer_holding_its_whole_prefetch_fetches_again_at_the_next_ack(
        store_client, cluster_name, monkeypatch) -> None:
    """Regression: a consumer whose prefetch was full looked again only every 50 ms, so once one
    fetch took a whole batch, a stream drained at a prefetch per 50 ms (320 a second)."""
    import flask_immutant.messaging.redis_broker as redis_broker

    monkeypatch.setattr(redis_broker, "SATURATED_POLL", 60.0)  # a poll would outlast the join below
    # Given a consumer holding as many messages as its prefetch, with one more waiting
    _, broker, _, _, consumer = _redis_consumer_of(store_client, cluster_name, "room", 3, 2)
    held = [next(consumer) for _ in range(2)]
    fetched: list[object] = []
    caller = threading.Thread(target=lambda: fetched.append(next(consumer)), daemon=True)
    caller.start()
    try:
        time.sleep(0.2)
        assert caller.is_alive()  # full: waiting for room
        # When a worker acknowledges one of them
        consumer.ack(held[0])
        # Then the consumer fetches the third at once
        caller.join(timeout=15)
        assert not caller.is_alive(), "the consumer did not fetch again at the ack"
        assert fetched[0].args == (2,)  # type: ignore[attr-defined]
        # And once the engine releases its consumers, a full one waits no more, however often asked
        broker.released.set()
        for _ in range(3):
            caller = threading.Thread(target=lambda: next(consumer), daemon=True)
            caller.start()
            caller.join(timeout=15)
            assert not caller.is_alive(), "a full consumer waited for room after the release"
    finally:
        broker.released.set()


def test_a_stopping_runtime_ends_its_own_consumers_waits_without_tokens_others_could_take(
        store_client, cluster_name) -> None:
    """Regression: the stop left its wake-ups on the queue's shared wake list, where a consumer of
    another node could take them, or clear them as stale, first; the stopping consumer then sat
    out its whole idle wait (3 s), and other nodes' consumers woke for nothing."""
    # Given an idle consumer waiting for a wake token
    backend, broker, queue, _, consumer = _redis_consumer_of(store_client, cluster_name, "release", 0, 8)
    consumer.idle_wait = 60.0
    assert next(consumer) is None  # the queue is empty
    caller = threading.Thread(target=lambda: next(consumer), daemon=True)
    caller.start()
    time.sleep(0.3)
    assert caller.is_alive()
    # When its runtime stops (the engine sets ``stopping``, then wakes its consumers)
    broker.stopping.set()
    backend.wake(broker, [queue])
    # Then its wait ends, through a list of its own: the queue's wake list is left alone
    caller.join(timeout=15)
    assert not caller.is_alive(), "the stopping consumer still waits"
    assert store_client.llen(backend.keys.messaging_wake(queue)) == 0
    assert 0 < store_client.pttl(backend.keys.messaging_release(broker.broker_id)) <= 60_000


def test_a_consumer_pauses_between_fetches_only_while_messages_stream_in() -> None:
    from flask_immutant.messaging.redis_broker import LINGER_BATCH, LINGER_MAX, LINGER_RATE, ArrivalRate

    now = [100.0]
    rate = ArrivalRate(clock=lambda: now[0])
    # A trickle: no pause, a message is fetched as its token comes
    now[0] += 1.0
    rate.observe(1)
    assert rate.linger() == 0.0
    # A stream of 4,000 a second: a pause that gathers about LINGER_BATCH messages
    now[0] += 0.125
    rate.observe(500)
    assert rate.linger() == pytest.approx(LINGER_BATCH / 4000)
    # A slower stream gathers fewer in the longest pause, and below LINGER_RATE no pause is made
    now[0] += 0.125
    rate.observe(100)
    assert rate.linger() == LINGER_MAX
    now[0] += 0.125
    rate.observe(int(LINGER_RATE * 0.125) - 1)
    assert rate.linger() == 0.0


def test_contract_dramatiq_redis_fetch_stops_at_an_empty_queue() -> None:
    """The consumer takes a fetch that returned fewer messages than it asked for as "the queue is empty
    now" (redis_broker.waking_consumer): Dramatiq's fetch pops until the list is empty, from the list
    named ``<namespace>:<queue>``, which the consumer's token-clearing script reads."""
    from importlib import resources

    dispatch = resources.files("dramatiq.brokers").joinpath("redis", "dispatch.lua").read_text()
    fetch = dispatch[dispatch.index('command == "fetch"'):]
    assert 'redis.call("lpop", queue_full_name)' in fetch and "if not message_id then\n            break" in fetch
    assert 'local queue_full_name = namespace .. ":" .. queue_name' in dispatch


def _script_calls(client) -> int:
    """Script calls the store has run since its statistics were last reset."""
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def test_a_redis_consumer_acknowledges_what_its_workers_handled_in_one_call_before_it_fetches_again(
        private_redis, cluster_name) -> None:
    """Issue 14: each worker thread acknowledged its message with a script call of its own (one round
    trip, about 85 us of the process's CPU, a message); the consumer thread now sends them all in one
    call before its next fetch."""
    import redis

    client = redis.Redis.from_url(private_redis.url)
    backend, broker, queue, _, consumer = _redis_consumer_of(client, cluster_name, "acks", 15, 5)
    handled = [next(consumer) for _ in range(5)]
    for message in handled:  # a first round, so every script is loaded
        consumer.ack(message)
    handled = [next(consumer) for _ in range(5)]
    client.config_resetstat()
    # When five worker threads acknowledge their messages
    workers = [threading.Thread(target=consumer.ack, args=(message,)) for message in handled]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    # Then the consumer's next call acknowledges all five in one script call, then fetches
    following = next(consumer)
    assert _script_calls(client) == 2, client.info("commandstats")
    assert following.args == (10,)  # type: ignore[attr-defined]
    acks = client.smembers(f"{backend.namespace}:__acks__.{broker.broker_id}.{queue}")
    fetched = {message_id.decode() for message_id in acks}
    assert len(fetched) == 5 and not fetched & {m.options["redis_message_id"] for m in handled}
    assert sorted(client.hkeys(f"{backend.namespace}:{queue}.msgs")) == sorted(acks)
    client.close()


def test_an_ack_while_the_redis_consumer_waits_for_a_wake_token_reaches_the_store_at_once(
        store_client, cluster_name) -> None:
    """Listed acks wait for the consumer's next fetch, which an idle consumer makes only at a wake
    token (up to ``idle_wait``): while it waits, a worker acknowledges on its own thread."""
    from support import wait_until

    # Given a consumer that handed out its only message and waits for a wake token
    backend, broker, queue, _, consumer = _redis_consumer_of(store_client, cluster_name, "idle", 1, 8)
    consumer.idle_wait = 60.0
    message = next(consumer)
    waiting = threading.Thread(target=lambda: next(consumer), daemon=True)
    waiting.start()
    acks = f"{backend.namespace}:__acks__.{broker.broker_id}.{queue}"
    try:
        wait_until(lambda: consumer._waiting, timeout=10, message="the consumer to wait for a token")
        # When a worker acknowledges the message
        consumer.ack(message)
        # Then it is acknowledged in the store at once (by the worker, or by the consumer's own
        # send if that took the list first), while the consumer still waits
        wait_until(lambda: not store_client.exists(acks), timeout=2)
        assert not store_client.exists(f"{backend.namespace}:{queue}.msgs")
        assert waiting.is_alive()
    finally:
        broker.stopping.set()
        backend.wake(broker, [queue])
        waiting.join(15)


def test_a_closing_redis_consumer_acknowledges_what_was_handled_and_keeps_what_the_store_refused(
        private_redis, cluster_name) -> None:
    """A consumer closed (a stop, or a restart after an error) with acks still listed sends them; if
    the store refuses them they stay listed, and a worker finishing after the close sends its own
    ack on its thread, the kept ones with it."""
    import redis

    from support import store_refusing

    client = redis.Redis.from_url(private_redis.url)
    backend, broker, queue, _, consumer = _redis_consumer_of(client, cluster_name, "close", 4, 8)
    handled = [next(consumer) for _ in range(4)]
    acks = f"{backend.namespace}:__acks__.{broker.broker_id}.{queue}"
    consumer.ack(handled[0])
    consumer.close()
    assert client.scard(acks) == 3  # sent at the close
    # Given two handled messages listed while the store refuses writes, and one still in a handler
    with store_refusing(private_redis.socket, "NOREPLICAS"):
        consumer.ack(handled[1])  # closed: sent at once, and refused
        consumer.ack(handled[2])
        # Then the refused acks are kept: the messages stay unacknowledged, neither lost nor acked twice
        assert client.scard(acks) == 3
        assert broker.pending_acks.unsent(queue) == {m.options["redis_message_id"] for m in handled[1:3]}
    # And the worker finishing once the store answers again sends all three
    consumer.ack(handled[3])
    assert not client.exists(acks)
    assert not client.exists(f"{backend.namespace}:{queue}.msgs")
    client.close()


@contextlib.contextmanager
def _unbound_with_a_message_in_its_handler(immutant_home, cluster_name: str, name: str, **config: object):
    """An engine in this process whose queue ``name`` had a message in its handler when its only
    listener stopped (the queue's consumer thread ended); yields the case: ``state``, ``engine``,
    ``queue``, ``acks`` (the ack set's key), ``release`` (set: the handler returns) and ``stop()``
    (the runtime's stop, made at the end unless the test did)."""
    from support import wait_until

    app = Flask(name)
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name, IMMUTANT_TRACING="off",
                      **config)
    ImmutantExtension(app)
    state = get_state(app)
    messaging = messaging_for(app)
    started, release = threading.Event(), threading.Event()
    listener = messaging.listen(f"/queue/{name}", lambda body: (started.set(), release.wait(30)))
    runtime = SimpleNamespace(app=app, settings=state.settings)
    messaging.runtime_started(runtime)  # type: ignore[arg-type]
    try:
        engine = messaging.engine
        assert engine is not None
        messaging.publish(f"/queue/{name}", "slow")
        assert started.wait(15)
        listener.stop()
        wait_until(lambda: not engine.worker.consumers[listener.queue].is_alive(), timeout=15)
        yield SimpleNamespace(state=state, engine=engine, queue=listener.queue, release=release,
                              acks=f"{state.keys.messaging_namespace}:__acks__.{engine.consumer_id}.{listener.queue}",
                              stop=lambda: messaging.runtime_stopping(runtime))  # type: ignore[arg-type]
    finally:
        release.set()
        if messaging.engine is not None:
            messaging.runtime_stopping(runtime)  # type: ignore[arg-type]
        state.store.close()


def test_a_queue_whose_last_listener_stopped_still_acknowledges_the_message_in_its_handler(
        embedded_store, immutant_home, cluster_name) -> None:
    """The engine stops a queue's consumer thread when its last listener stops, and Dramatiq never
    closed that consumer: the ack of a message still in its handler would stay listed there, and
    the message would run again once the node left. The consumer is closed when its thread ends."""
    from support import wait_until

    # Given a message in its handler when its queue's listener stopped (with a failure timeout
    # whose reaper interval, 37.5 s, outlasts the test: the reaper loop, which sends acks left for
    # a whole interval, must not be what sends this one)
    with _unbound_with_a_message_in_its_handler(immutant_home, cluster_name, "unbound",
                                                IMMUTANT_FAILURE_TIMEOUT=300) as case:
        # When the handler returns
        case.release.set()
        # Then the message is acknowledged in the store, with the node still running
        wait_until(lambda: not case.state.store.exists(case.acks), timeout=10, message="the handled message's ack")


def test_acks_the_store_refused_after_the_last_listener_stopped_go_out_once_it_answers(
        private_redis, immutant_home, cluster_name) -> None:
    """Regression (review of the batched acks): a handler returning while the store refused writes
    (READONLY, NOREPLICAS) had its ack dropped by Dramatiq (a "bug in Dramatiq" log), and with its
    queue's consumer gone no fetch would send a kept one: the message stayed in the ack set until the
    node left, and then ran again. The engine's reaper loop sends what is left."""
    from support import store_refusing, wait_until

    with _unbound_with_a_message_in_its_handler(immutant_home, cluster_name, "refused",
                                                IMMUTANT_REDIS_URL=private_redis.url) as case:
        # When the handler returns while the store refuses writes
        with store_refusing(private_redis.socket, "NOREPLICAS"):
            case.release.set()
            wait_until(lambda: case.engine.broker.pending_acks.unsent(case.queue), timeout=10,
                       message="the refused ack to be kept")
            assert case.state.store.exists(case.acks)
        # Then its ack reaches the store once the store answers, with the node still running
        wait_until(lambda: not case.state.store.exists(case.acks), timeout=10, message="the kept ack")


def test_the_stop_sends_acks_left_over_while_the_node_is_still_a_live_consumer(
        private_redis, immutant_home, cluster_name, monkeypatch) -> None:
    """An ack the store refused and nobody sent yet goes out at the stop, before the node's consumer
    heartbeat is deleted (other nodes' reapers would then requeue the handled message) and before
    the leaving reap requeues what is unacknowledged."""
    from support import store_refusing, wait_until

    with _unbound_with_a_message_in_its_handler(
            immutant_home, cluster_name, "leftover", IMMUTANT_REDIS_URL=private_redis.url,
            IMMUTANT_FAILURE_TIMEOUT=300) as case:  # no reaper pass meanwhile
        state, engine, queue = case.state, case.engine, case.queue
        # Given a handled message whose ack the store refused
        with store_refusing(private_redis.socket, "NOREPLICAS"):
            case.release.set()
            wait_until(lambda: engine.broker.pending_acks.unsent(queue), timeout=10)
        heartbeat = state.keys.messaging_consumer(engine.consumer_id)
        wait_until(lambda: state.store.exists(heartbeat), timeout=10, message="the consumer heartbeat")
        heartbeat_at_send: list[bool] = []
        send = engine._send_pending_acks

        def watched(older_than: float = 0.0) -> int:
            if older_than == 0.0:  # the stop's call, not a reaper pass
                heartbeat_at_send.append(bool(state.store.exists(heartbeat)))
            return send(older_than)

        monkeypatch.setattr(engine, "_send_pending_acks", watched)
        # When the node stops
        case.stop()
        # Then the ack went out while the heartbeat still stood, and the message was not requeued
        assert heartbeat_at_send == [True]
        namespace = state.keys.messaging_namespace
        assert not state.store.exists(case.acks)
        assert not state.store.exists(f"{namespace}:{queue}.msgs") and not state.store.llen(f"{namespace}:{queue}")


def test_contract_dramatiq_redis_ack_layout() -> None:
    """redis_acks_send.lua acknowledges a batch as Dramatiq's ``ack`` command does one message: it
    relies on the ack set ``<namespace>:__acks__.<broker id>.<queue>`` and the hash
    ``<namespace>:<queue>.msgs`` (redis_acks.ack_set, messages_hash), and on an ack being "SREM
    from the ack set; only if it was there, HDEL from the hash"."""
    from importlib import resources

    from flask_immutant.messaging.redis_acks import ack_set, messages_hash

    dispatch = resources.files("dramatiq.brokers").joinpath("redis", "dispatch.lua").read_text()
    ack = dispatch[dispatch.index('elseif command == "ack"'):dispatch.index('elseif command == "nack"')]
    assert 'if redis.call("srem", queue_acks, message_id) > 0 then' in ack
    # WakingConsumer.ack replaces Dramatiq's consumer ack, which is this and its bookkeeping only
    import inspect

    from dramatiq.brokers.redis import RedisBroker

    consumer_ack = inspect.getsource(RedisBroker.consumer_class.fget(None).ack)  # type: ignore[union-attr]
    body = [line.strip() for line in consumer_ack.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
    assert body == ["try:", 'self.broker.do_ack(self.queue_name, message.options["redis_message_id"])',
                    "except redis.ConnectionError as e:", "raise ConnectionClosed(e) from None", "finally:",
                    "self.queued_message_ids.discard(message.message_id)"], body
    assert 'redis.call("hdel", queue_messages, message_id)' in ack
    for line in ('local acks = namespace .. ":__acks__." .. worker_id',
                 'local queue_acks = acks .. "." .. queue_name',
                 'local queue_full_name = namespace .. ":" .. queue_name',
                 'local queue_messages = queue_full_name .. ".msgs"'):
        assert line in dispatch, line
    broker = SimpleNamespace(namespace="ns", broker_id="b1")
    assert ack_set(broker, "q") == "ns:__acks__.b1.q" and messages_hash(broker, "q") == "ns:q.msgs"


def _send(broker, queue: str, ids: list[str]) -> None:
    for message_id in ids:
        broker.pending_acks.add(queue, message_id)
    broker.pending_acks.send(queue)


def test_acks_being_sent_still_count_as_unsent_until_the_store_answered(
        holding_proxy, cluster_name) -> None:
    """Regression (second review): a sender took the ids off the list before its call, and until the
    store answered they were in neither place; a malformed message with the same bytes as one of
    them, looked up by bytes in the ack set meanwhile (the reaper loop sending), was matched to it."""
    import redis

    client = redis.Redis.from_url(holding_proxy.url)
    _, broker, queue, _, consumer = _redis_consumer_of(client, cluster_name, "flight", 2, 8)
    message = next(consumer)
    redis_id = message.options["redis_message_id"]
    broker.pending_acks.add(queue, redis_id)
    # Given a send whose call reached the store and waits for the answer
    held = holding_proxy.hold(redis_id.encode())
    sender = threading.Thread(target=broker.pending_acks.send, args=(queue,))
    sender.start()
    try:
        assert held.wait(10)
        # Then the id still counts as unsent (so a look-up by bytes skips it)
        assert broker.pending_acks.unsent(queue) == {redis_id}
    finally:
        holding_proxy.release()
        sender.join(10)
    # And once the store answered, as sent
    assert broker.pending_acks.unsent(queue) == set()
    client.close()


def test_a_refused_send_keeps_its_ids_whatever_the_error_and_warns_once_per_queue(
        private_redis, cluster_name, caplog) -> None:
    """Handled messages must not lose their ack to an error: the store's (kept, warned about once
    per queue until a send succeeds, not once a message) or any other (kept too)."""
    import logging

    import redis

    from support import store_refusing

    client = redis.Redis.from_url(private_redis.url)
    _, broker, queue, _, consumer = _redis_consumer_of(client, cluster_name, "refused", 3, 8)
    ids = [next(consumer).options["redis_message_id"] for _ in range(3)]
    pending = broker.pending_acks
    caplog.set_level(logging.INFO, logger="flask_immutant.messaging")
    with store_refusing(private_redis.socket, "NOREPLICAS"):
        for message_id in ids[:2]:
            pending.add(queue, message_id)
            with pytest.raises(redis.ResponseError):
                pending.send(queue)
    assert pending.unsent(queue) == set(ids[:2])
    script, pending._script = pending._script, lambda **_: (_ for _ in ()).throw(RuntimeError("a bug"))
    pending.add(queue, ids[2])
    with pytest.raises(RuntimeError):
        pending.send(queue)
    assert pending.unsent(queue) == set(ids)
    pending._script = script
    assert pending.send(queue) == 3 and pending.unsent(queue) == set()
    assert not client.exists(f"{broker.namespace}:__acks__.{broker.broker_id}.{queue}")
    messages = [record.getMessage() for record in caplog.records if queue in record.getMessage()]
    assert len(messages) == 2, messages
    assert "wait for the store" in messages[0] and "reach the store again" in messages[1]
    client.close()


def test_the_reaper_loop_sends_only_lists_no_consumer_sent_for_a_while(store_client, cluster_name) -> None:
    """The reaper loop sends what a closed consumer left (``send_all``), not a live consumer's fresh
    list, which that consumer sends before its next fetch."""
    from flask_immutant.messaging.redis_acks import PendingAcks

    _, broker, queue, _, consumer = _redis_consumer_of(store_client, cluster_name, "aged", 1, 8)
    message = next(consumer)
    now = [100.0]
    pending = PendingAcks(broker, clock=lambda: now[0])
    pending.add(queue, message.options["redis_message_id"])
    assert pending.send_all(older_than=0.25) == 1  # fresh: left to its consumer
    assert store_client.exists(f"{broker.namespace}:__acks__.{broker.broker_id}.{queue}")
    now[0] += 0.25
    assert pending.send_all(older_than=0.25) == 0
    assert not store_client.exists(f"{broker.namespace}:__acks__.{broker.broker_id}.{queue}")


def test_a_batch_ack_leaves_the_store_as_dramatiq_acks_do(store_client, cluster_name) -> None:
    """The same store state after our batch ack as after Dramatiq's own ack of each message."""
    backend, broker, queue, _, consumer = _redis_consumer_of(store_client, cluster_name, "same", 4, 8)
    messages = [next(consumer) for _ in range(4)]
    ids = [m.options["redis_message_id"] for m in messages]
    acks, hashed = f"{backend.namespace}:__acks__.{broker.broker_id}.{queue}", f"{backend.namespace}:{queue}.msgs"
    broker.do_ack(queue, ids[0])
    after_dramatiq = (store_client.smembers(acks), set(store_client.hkeys(hashed)))
    _send(broker, queue, [ids[1], "never-fetched", ids[1]])  # unknown and repeated ids change nothing
    assert (store_client.smembers(acks), set(store_client.hkeys(hashed))) == (
        after_dramatiq[0] - {ids[1].encode()}, after_dramatiq[1] - {ids[1].encode()})
    assert ids[0].encode() not in after_dramatiq[0] | after_dramatiq[1]
    # A key of another type where the ack set should be (garbage) is skipped, not an error
    store_client.delete(acks)
    store_client.set(acks, "garbage")
    _send(broker, queue, ids[2:])
    assert store_client.get(acks) == b"garbage" and len(store_client.hkeys(hashed)) == 2


def test_contract_dramatiq_rabbitmq_consumer_ack() -> None:
    """rabbitmq_broker.batching_consumer replaces the ack of whatever ``RabbitmqBroker.consumer_class``
    gives: it relies on Dramatiq making consumers through that property, on an ack being "forget the
    tag in ``known_tags``, then ``basic_ack`` it on ``channel`` from the consumer thread through
    ``connection.add_callback_threadsafe``", and on pika's errors meaning a lost connection."""
    import inspect

    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    assert "self.consumer_class(" in inspect.getsource(RabbitmqBroker.consume)
    consumer = RabbitmqBroker.consumer_class.fget(None)  # type: ignore[union-attr]
    ack = inspect.getsource(consumer.ack)
    for part in ("self.known_tags.remove(message._tag)", "self.connection.add_callback_threadsafe(",
                 "self.channel.basic_ack", "pika.exceptions.AMQPConnectionError",
                 "pika.exceptions.AMQPChannelError", "ConnectionClosed"):
        assert part in ack, part
    init = inspect.getsource(consumer.__init__)
    assert all(name in init for name in ("self.known_tags", "self.connection", "self.channel"))
    # The acks still listed at a stop go out in a callback queued before Dramatiq's close, which
    # runs every queued callback before it closes the channel; the broker makes a consumer with
    # its prefetch (half of it wakes the consumer); the ack timer is pika's public call_later.
    assert "self.connection.add_callback_threadsafe(all_callbacks_handled.set)" in inspect.getsource(consumer.close)
    assert "self.consumer_class(self, queue_name, prefetch, timeout)" in inspect.getsource(RabbitmqBroker.consume)
    import pika

    assert callable(pika.BlockingConnection.call_later)
    # One multiple ack covers the tags below the lowest in known_tags: Dramatiq adds a tag there
    # when it hands the delivery out, and rejects one it cannot decode through _nack (listed too).
    handout = inspect.getsource(consumer.__next__)
    assert "self.known_tags.add(method.delivery_tag)" in handout and "self._nack(method.delivery_tag)" in handout
    assert "multiple" in inspect.signature(pika.adapters.blocking_connection.BlockingChannel.basic_ack).parameters


@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_a_stop_past_its_deadline_still_lets_each_consumer_end_its_poll(broker, monkeypatch) -> None:
    """Regression (review of the stop without sleeps): when a handler outlived the stop's deadline,
    ``Worker.stop`` got no time left and closed each consumer while its thread was still in its
    poll, two threads on one pika connection (which is not thread-safe)."""
    import types
    import uuid

    import dramatiq
    from dramatiq.worker import _ConsumerThread

    from flask_immutant.messaging.engine import Engine
    from flask_immutant.messaging.rabbitmq_broker import batching_rabbitmq_broker
    from flask_immutant.messaging.workqueue import ClosableWorkQueue

    rabbit = batching_rabbitmq_broker()(url="amqp://guest:guest@127.0.0.1:5672/%2F")
    queue = f"immutant-test-overrun-{uuid.uuid4().hex[:8]}"
    handling = threading.Event()

    @dramatiq.actor(queue_name=queue, broker=rabbit)
    def slow() -> None:
        handling.set()
        time.sleep(1.5)

    worker = dramatiq.Worker(rabbit, worker_threads=1, worker_timeout=1000)
    worker.work_queue = work = ClosableWorkQueue()
    worker.start()
    alive_at_close: list[list[str]] = []
    close = _ConsumerThread.close

    def watched_close(thread: _ConsumerThread) -> None:
        alive_at_close.append([t.name for t in worker.consumers.values() if t.is_alive()])
        close(thread)

    try:
        # Given a handler still running when the stop's deadline is 0.2 s away
        slow.send()
        assert handling.wait(10)
        deadline = time.monotonic() + 0.2
        # When the engine stops the worker
        Engine._release_worker(types.SimpleNamespace(worker=worker, _work_queue=work, broker=rabbit), deadline)
        monkeypatch.setattr(_ConsumerThread, "close", watched_close)
        worker.stop(timeout=int(max(0.0, deadline - time.monotonic()) * 1000))
        # Then no consumer was closed while its thread still polled
        assert alive_at_close and all(alive == [] for alive in alive_at_close), alive_at_close
    finally:
        rabbit.channel.queue_delete(queue)
        for suffix in (".DQ", ".XQ"):
            rabbit.channel.queue_delete(queue + suffix)
        rabbit.close()


class _RabbitQueue:
    """A RabbitMQ queue with one actor on flask-immutant's broker, deleted afterwards."""

    def __init__(self, name: str) -> None:
        import uuid

        import dramatiq

        from flask_immutant.messaging.rabbitmq_broker import batching_rabbitmq_broker

        self.broker = batching_rabbitmq_broker()(url="amqp://guest:guest@127.0.0.1:5672/%2F")
        self.name = f"immutant-test-{name}-{uuid.uuid4().hex[:8]}"
        self.actor = dramatiq.actor(lambda n: None, actor_name="job", queue_name=self.name, broker=self.broker)

    def ready(self) -> int:
        """Messages waiting in the queue (a requeued one is counted here again)."""
        return int(self.broker.channel.queue_declare(self.name, passive=True).method.message_count)

    def delete(self) -> None:
        for suffix in ("", ".DQ", ".XQ"):
            self.broker.channel.queue_delete(self.name + suffix)
        self.broker.close()


def _consume_in_thread(consumer, seconds: float):  # type: ignore[no-untyped-def]
    """Run ``consumer`` on a thread of its own, as Dramatiq's consumer thread does, for about
    ``seconds``; its messages arrive on the returned queue. The thread ends at its first poll
    after that, or when the consumer fails (its queue deleted)."""
    import queue as queues

    delivered: queues.Queue = queues.Queue()

    def run() -> None:
        deadline = time.monotonic() + seconds
        with contextlib.suppress(Exception):
            while time.monotonic() < deadline:
                message = next(consumer)
                if message is not None:
                    delivered.put(message)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return delivered, thread


@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_an_ack_with_no_delivery_after_it_is_sent_within_the_ack_delay(broker, monkeypatch) -> None:
    """A listed ack waits for the consumer thread to run anyway; with no delivery to come, the
    timer the delivery armed sends it, long before the consumer's own poll would end."""
    from flask_immutant.messaging import rabbitmq_broker

    from support import rabbitmq_queue_counts, wait_until

    # long enough that the ack below surely finds the timer still armed, on a busy machine too
    monkeypatch.setattr(rabbitmq_broker, "ACK_DELAY", 2.0)
    rabbit = _RabbitQueue("ack-timer")
    consumer = rabbit.broker.consume(rabbit.name, prefetch=16, timeout=60_000)
    thread = None
    try:
        rabbit.actor.send(1)
        delivered, thread = _consume_in_thread(consumer, seconds=1)
        message = delivered.get(timeout=10)
        # When a worker acks it while the consumer thread waits in a 60 s poll
        consumer.ack(message)
        assert not consumer._waking  # the timer is armed: no wake-up was queued for this ack
        # Then the server has the ack within seconds (not the poll's 60): the timer sent it
        wait_until(lambda: rabbitmq_queue_counts(rabbit.name)[:2] == (0, 0), timeout=20)
        assert thread.is_alive()  # still in that poll
    finally:
        rabbit.delete()  # cancels the consumer: its thread ends
        if thread is not None:
            thread.join(10)
        with contextlib.suppress(Exception):
            consumer.connection.close()


@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_acks_still_listed_at_a_stop_are_sent_before_the_channel_closes(broker, monkeypatch) -> None:
    """The consumer's close sends what is listed first: a message handled just before a stop is
    not given back to the queue (and handled again elsewhere)."""
    from flask_immutant.messaging import rabbitmq_broker

    from support import wait_until

    monkeypatch.setattr(rabbitmq_broker, "ACK_DELAY", 3600.0)  # only the close can send it
    rabbit = _RabbitQueue("ack-close")
    consumer = rabbit.broker.consume(rabbit.name, prefetch=16, timeout=1000)
    try:
        rabbit.actor.send(1)
        message = wait_until(lambda: next(consumer), timeout=10)
        consumer.ack(message)
        assert consumer._acks == [message._tag]  # listed, not sent
        consumer.close()
        assert rabbit.ready() == 0  # acknowledged, not requeued by the close
    finally:
        rabbit.delete()


@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_one_multiple_ack_never_covers_a_delivery_still_being_handled_or_rejected(broker, monkeypatch) -> None:
    """Listed acks below every delivery still being handled go out as one ``basic_ack`` with
    ``multiple``; a rejection listed with them goes first, or the multiple ack would take its tag
    (and the rejection of an unknown tag would close the channel)."""
    from flask_immutant.messaging import rabbitmq_broker

    from support import rabbitmq_queue_counts, wait_until

    monkeypatch.setattr(rabbitmq_broker, "ACK_DELAY", 3600.0)  # sent only when this test says
    rabbit = _RabbitQueue("ack-multiple")
    consumer = rabbit.broker.consume(rabbit.name, prefetch=16, timeout=1000)
    sent: list[tuple[str, int, bool]] = []
    channel = consumer.channel
    ack, nack = channel.basic_ack, channel.basic_nack
    monkeypatch.setattr(channel, "basic_ack", lambda tag, multiple=False: (sent.append(("ack", tag, multiple)),
                                                                           ack(tag, multiple=multiple)))
    monkeypatch.setattr(channel, "basic_nack", lambda tag, requeue=True: (sent.append(("nack", tag, False)),
                                                                          nack(tag, requeue=requeue)))
    try:
        for n in range(6):
            rabbit.actor.send(n)
        messages = [wait_until(lambda: next(consumer), timeout=10) for _ in range(6)]
        assert [m._tag for m in messages] == [1, 2, 3, 4, 5, 6]
        # Given 1, 3 and 6 handled, 2 failed, 4 and 5 still being handled
        for n in (0, 2, 5):
            consumer.ack(messages[n])
        messages[1].failed = True
        consumer.nack(messages[1])
        consumer._send_acks()
        # Then 2 is rejected first, 1 and 3 go in one ack, 6 alone (4 is still in a handler)
        assert sent == [("nack", 2, False), ("ack", 3, True), ("ack", 6, False)]
        assert consumer.channel.is_open
        wait_until(lambda: rabbitmq_queue_counts(rabbit.name)[:2] == (0, 2), timeout=20)
        # When 4 and 5 are handled too, one multiple ack settles them
        consumer.ack(messages[4])
        consumer.ack(messages[3])
        consumer._send_acks()
        assert sent[3:] == [("ack", 5, True)]
        wait_until(lambda: rabbitmq_queue_counts(rabbit.name)[:2] == (0, 0), timeout=20)
        assert rabbitmq_queue_counts(rabbit.name + ".XQ")[0] == 1  # the rejected one, dead-lettered
    finally:
        consumer.close()
        rabbit.delete()


@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_a_failed_wake_up_keeps_the_listed_acks(broker, monkeypatch) -> None:
    """Regression (review of the multiple acks): a wake-up that failed for any reason but a lost
    connection dropped every listed ack and rejection while the connection was up: messages left
    unacknowledged, and a dropped rejection could later be covered by a multiple ack."""
    from support import wait_until

    rabbit = _RabbitQueue("ack-wake")
    consumer = rabbit.broker.consume(rabbit.name, prefetch=2, timeout=1000)  # every ack wakes
    try:
        rabbit.actor.send(1)
        message = wait_until(lambda: next(consumer), timeout=10)

        def broken(callback):  # type: ignore[no-untyped-def]
            raise OSError("the wake-up socket is full")

        monkeypatch.setattr(consumer.connection, "add_callback_threadsafe", broken)
        consumer.ack(message)
        assert consumer._acks == [message._tag] and not consumer._waking
        monkeypatch.undo()
        consumer.close()  # sends the list
        assert rabbit.ready() == 0
    finally:
        rabbit.delete()


def _rabbitmq_sockets() -> set[int]:
    """This process's open descriptors of TCP connections to RabbitMQ's port."""
    import os
    import socket

    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                with socket.socket(fileno=os.dup(int(name))) as sock:
                    if sock.family == socket.AF_INET and sock.getpeername()[1] == 5672:
                        found.add(int(name))
    return found


@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_a_connection_lost_while_acks_are_listed_is_the_connection_error_dramatiq_restarts_on(
        broker, monkeypatch) -> None:
    """Regression (review of the listed acks): the acks sent before the consumer waits are its
    first I/O after the network dropped, and pika's own error escaped there; Dramatiq's consumer
    thread took it for an unexpected error (CRITICAL, with a traceback) instead of ConnectionClosed."""
    import os
    import socket

    from dramatiq.errors import ConnectionClosed

    from flask_immutant.messaging import rabbitmq_broker

    from support import wait_until

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("finds the consumer's socket in /proc")
    monkeypatch.setattr(rabbitmq_broker, "ACK_DELAY", 3600.0)
    rabbit = _RabbitQueue("ack-lost")
    rabbit.broker.declare_queue(rabbit.name, ensure=True)  # the broker's own connection, opened first
    before = _rabbitmq_sockets()
    consumer = rabbit.broker.consume(rabbit.name, prefetch=16, timeout=1000)
    (descriptor,) = _rabbitmq_sockets() - before  # the consumer's connection
    try:
        rabbit.actor.send(1)
        message = wait_until(lambda: next(consumer), timeout=10)
        consumer.ack(message)  # listed
        # When the network drops before the consumer thread runs again
        with socket.socket(fileno=os.dup(descriptor)) as dropped:
            dropped.shutdown(socket.SHUT_RDWR)
        # Then it fails as a lost connection, which Dramatiq's consumer thread restarts quietly
        with pytest.raises(ConnectionClosed):
            next(consumer)
    finally:
        with contextlib.suppress(Exception):
            consumer.connection.close()
        rabbit.delete()


@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_a_consumer_whose_prefetch_is_held_by_listed_acks_is_woken_to_send_them(broker, monkeypatch) -> None:
    """RabbitMQ delivers nothing past the prefetch: acks listed to ride along with the next
    delivery would wait for one that cannot come. Half the prefetch listed wakes the consumer."""
    from flask_immutant.messaging import rabbitmq_broker

    from support import within

    monkeypatch.setattr(rabbitmq_broker, "ACK_DELAY", 3600.0)  # the timer never sends them here
    rabbit = _RabbitQueue("ack-prefetch")
    consumer = rabbit.broker.consume(rabbit.name, prefetch=4, timeout=60_000)  # its poll sends nothing
    thread = None
    try:
        for n in range(12):
            rabbit.actor.send(n)
        delivered, thread = _consume_in_thread(consumer, seconds=1)
        # When each delivered message is handled and acked (four at most delivered at a time)
        for _n in range(12):
            consumer.ack(delivered.get(timeout=within(10)))
        # Then every one was delivered: the acks that filled half the prefetch went out at once
        assert rabbit.ready() == 0
    finally:
        rabbit.delete()
        if thread is not None:
            thread.join(10)
        with contextlib.suppress(Exception):
            consumer.connection.close()


@pytest.mark.parametrize("broker", ["rabbitmq"])
def test_a_message_of_a_closed_channel_is_never_acked_on_the_next_one(broker) -> None:
    """Regression (review of the ack batching; Dramatiq's own consumer does it too): after a
    consumer restart, Dramatiq acks a message of the old channel through the new consumer, whose
    delivery tags start at 1 again: the tag could name another, unhandled message there."""
    rabbit = _RabbitQueue("tags")
    old = rabbit.broker.consume(rabbit.name, prefetch=1, timeout=1000)
    new = rabbit.broker.consume(rabbit.name, prefetch=1, timeout=1000)
    try:
        rabbit.actor.send(1)
        rabbit.actor.send(2)
        first = next(m for m in iter(lambda: next(old), object()) if m is not None)
        second = next(m for m in iter(lambda: next(new), object()) if m is not None)
        assert first._tag == second._tag == 1  # each channel numbers its deliveries from 1
        # When the new consumer is asked to ack the old channel's message
        new.ack(first)
        # Then it acks nothing: its own delivery 1 is still waiting for its handler
        assert new.known_tags == {1}
        new.ack(second)
        assert new.known_tags == set()
    finally:
        old.close()
        new.close()
        rabbit.delete()


def test_handler_counts_lose_nothing_and_never_break_a_reader_while_workers_update_them() -> None:
    """Regression: worker threads updated the engine's per-queue dicts unlocked while the heartbeat
    listed them; a listing while a worker added a queue raised ``dictionary changed size``."""
    import sys

    from flask_immutant.messaging.engine import HandlerCounts

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    counts, errors, reported = HandlerCounts(), [], []
    done = threading.Event()

    def heartbeat() -> None:
        while not done.is_set():
            try:
                counts.running()
                handled = counts.handled()
                reported.append(sum(handled.values()))
                counts.counted(handled)
            except RuntimeError as exc:
                errors.append(exc)
                return

    def worker(k: int) -> None:
        for i in range(3000):
            queue = f"q{k}-{i % 500}"  # new queues keep appearing while the heartbeat lists them
            counts.started(queue)
            counts.finished(queue)

    try:
        beat = threading.Thread(target=heartbeat)
        beat.start()
        workers = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        done.set()
        beat.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors
    assert counts.running() == {}
    assert sum(reported) + sum(counts.handled().values()) == 4 * 3000
