"""Pure-Python CPU flask-immutant adds per message, step by step (a benchmark, not a test).

    python bench/messaging_overhead.py [--number 20000] [--repeat 5] [--rabbitmq amqp://guest:guest@127.0.0.1/]

bench/messaging.py measures the whole path against raw Dramatiq, where the broker's and the
network's time blur what is ours. Here each step runs alone in a loop, with the broker call
stubbed out (nothing is sent, nothing is consumed), and prints microseconds per message (best of
``--repeat``). The publish side runs on the Redis backend and, with ``--rabbitmq``, on the RabbitMQ
one (``_publish_one`` with Dramatiq's ``enqueue`` stubbed); the worker side calls
``Engine.deliver`` as Dramatiq's worker thread would, with the engine's middleware hooks around it.
"""

from __future__ import annotations

import argparse
import tempfile
import timeit
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dramatiq import Message as DramatiqMessage
from dramatiq.broker import MessageProxy
from dramatiq.encoder import JSONEncoder
from flask import Flask

from flask_immutant import ImmutantExtension
from flask_immutant.messaging import messaging_for
from flask_immutant.messaging.codec import decode, envelope
from flask_immutant.messaging.core import Messaging
from flask_immutant.messaging.engine import DeadLetters, Engine
from flask_immutant.messaging.undecodable import GuardedConsumer, TolerantEncoder
from flask_immutant.store import EmbeddedStore


def per_message(label: str, fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Best of ``repeat`` loops of ``number`` calls, in microseconds per call (the best: the least
    disturbed by other load on a shared machine)."""
    best = min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6
    print(f"  {label:<60} {best:7.2f} us")
    return best


def messaging_of(home: Path, broker_url: str | None) -> tuple[Flask, Messaging]:
    app = Flask("bench-overhead")
    app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=f"benchov{uuid.uuid4().hex[:6]}",
                      IMMUTANT_BROKER_URL=broker_url, IMMUTANT_TRACING="off")
    ImmutantExtension(app)
    return app, messaging_for(app)


def publish_steps(messaging: Messaging, label: str, number: int, repeat: int) -> None:
    """``publish`` and its parts, the broker's own work stubbed out."""
    backend = messaging.backend
    destination = messaging.start("/queue/overhead")
    body = {"t": 0.0}
    print(f"\n== publish, {label} backend (broker call stubbed) ==")
    per_message("codec.envelope", lambda: envelope(destination.name, body), number, repeat)

    def outgoing() -> Any:
        return messaging._outgoing(destination, [(body, None)], priority=None, ttl=None, delay=None,
                                   properties=None, encoding="json", correlation_id=None, reply_to=None, trace={})

    per_message("Messaging._outgoing (envelope, id, Dramatiq message)", outgoing, number, repeat)
    if backend.kind == "rabbitmq":
        broker: Any = SimpleNamespace(enqueue=lambda message, delay=None: message)
        per_message("_outgoing + RabbitmqBackend.publish_many (enqueue stubbed)",
                    lambda: backend.publish_many(broker, [(outgoing()[0][2], None)]), number, repeat)
        stubbed: Any = broker
    else:
        calls = [0]

        def script(keys: Any, args: Any) -> list[int]:
            calls[0] += 1
            return [1] * ((len(args) - 1) // 3)

        backend.__dict__["_publish"] = script  # the cached script: the round trip is not ours
        broker = None
        per_message("_outgoing + RedisBackend.publish_many (script stubbed)",
                    lambda: backend.publish_many(broker, [(outgoing()[0][2], None)]), number, repeat)
        stubbed = None
    if stubbed is not None:
        messaging.__dict__["publisher"] = broker  # computed_once keeps its value there
    per_message("Messaging.publish, all of it", lambda: messaging.publish("/queue/overhead", body), number, repeat)


def worker_steps(app: Flask, messaging: Messaging, number: int, repeat: int) -> None:
    """What a Dramatiq worker thread runs of ours for one message: the middleware hooks and
    ``Engine.deliver`` with a listener that does nothing, and the consumer's decode."""
    engine = Engine(messaging, app, "bench")
    handled = [0]

    def handler(body: Any) -> None:
        handled[0] += 1

    listener = messaging.listen("/queue/worker", handler)
    engine.bind(listener)
    queue = listener.queue
    assert queue is not None
    data = envelope("/queue/worker", {"t": 0.0})
    raw = MessageProxy(DramatiqMessage(queue_name=queue, actor_name=f"immutant:{queue}", args=(data,), kwargs={},
                                       options={}, message_id=str(uuid.uuid4())))
    dead_letters = next(m for m in engine.broker.middleware if isinstance(m, DeadLetters))
    print("\n== worker thread (no broker) ==")
    per_message("codec.decode", lambda: decode(data, 0, "id"), number, repeat)

    def app_context() -> None:
        with app.app_context():
            pass

    per_message("app.app_context() push and pop", app_context, number, repeat)

    def deliver() -> None:
        dead_letters.before_process_message(engine.broker, raw)
        engine.deliver(queue, data)
        dead_letters.after_process_message(engine.broker, raw, result=None, exception=None)

    per_message("Engine.deliver", lambda: engine.deliver(queue, data), number, repeat)
    per_message("Engine.deliver with the middleware hooks", deliver, number, repeat)
    def hooks() -> None:
        engine.broker.emit_before("process_message", raw)
        engine.broker.emit_after("process_message", raw, result=None)

    per_message("Dramatiq's emit_before/emit_after process_message", hooks, number, repeat)
    guard = GuardedConsumer(engine.broker, iter(()), queue, lambda *args: None)  # type: ignore[arg-type]
    per_message("GuardedConsumer.refusal (consumer thread)", lambda: guard.refusal(raw), number, repeat)
    encoder = TolerantEncoder(JSONEncoder())
    wire = encoder.encode(raw.asdict())
    per_message("TolerantEncoder.decode (consumer thread)", lambda: encoder.decode(wire), number, repeat)
    per_message("  Dramatiq's JSONEncoder.decode alone", lambda: encoder.inner.decode(wire), number, repeat)
    assert handled[0] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--number", type=int, default=20000, help="calls per timed loop")
    parser.add_argument("--repeat", type=int, default=5, help="timed loops per step (the best is printed)")
    parser.add_argument("--rabbitmq", default=None, help="also time the RabbitMQ backend's publish")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="imt-bench-"))
    store = EmbeddedStore(home)
    store.ensure_running()
    try:
        app, messaging = messaging_of(home, None)
        publish_steps(messaging, "Redis", args.number, args.repeat)
        worker_steps(app, messaging, args.number, args.repeat)
        if args.rabbitmq:
            publish_steps(messaging_of(home, args.rabbitmq)[1], "RabbitMQ", args.number, args.repeat)
    finally:
        store.stop()


if __name__ == "__main__":
    main()
