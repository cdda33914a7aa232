"""Messaging throughput, latency and failover redelivery (a benchmark, not a test).

    python bench/messaging.py [--messages 5000] [--threads 8] [--rabbitmq amqp://guest:guest@127.0.0.1/]

1. Publish-and-consume throughput and end-to-end latency (p50/p99) through flask-immutant and
   through raw Dramatiq, on the same Redis (a private embedded store), the same worker threads and
   the same poll interval, in one run; prints the ratio (target >= 0.95). With ``--rabbitmq`` the
   same comparison runs on RabbitMQ too. On Redis a run ends once the store holds every message
   acknowledged (ours are sent in batches after the handlers return), on RabbitMQ at the last
   handler (ours go within 3 ms).
2. ``publish_many`` of ``--batch`` messages (100) against as many single publishes, publishing
   only, interleaved rounds; prints the ratio (target >= 5x). ``--only-batch`` runs just this.
3. A backlog of ``--backlog`` messages (5000) queued first, then drained by one runtime, against
   raw Dramatiq the same way: messages per second and CPU per message (0 skips it).
4. Redelivery after SIGKILL of a consumer node holding messages, with no other traffic: time from
   the kill until a surviving node has handled every one (target <= failure timeout + 1 s, 0 lost).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dramatiq
from dramatiq.middleware import Retries
from flask import Flask

from flask_immutant import ImmutantExtension
from flask_immutant.messaging import messaging_for
from flask_immutant.messaging.redis_acks import messages_hash
from flask_immutant.store import EmbeddedStore, client_from_url


class Sink:
    """Counts handled messages and their end-to-end latency."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.last = 0.0

    def __call__(self, body: Any) -> None:
        now = time.perf_counter()
        with self.lock:
            self.latencies.append(now - body["t"])
            self.last = now
            if len(self.latencies) >= self.expected:
                self.done.set()


def acknowledged(client: Any, hashed: str) -> Callable[[], bool]:
    """Redis: whether every message of a queue is acknowledged (Dramatiq deletes a message's data
    from the queue's hash at its ack). Ours sends acks in batches after the handlers return, so a
    run ends when the last ack reached the store, not at the last handler, for both sides."""
    return lambda: client.hlen(hashed) == 0


def settle(sink: Sink, settled: Callable[[], bool] | None) -> float:
    """When the run ended: the last handler's return, or later the moment ``settled`` holds."""
    if settled is None:
        return sink.last
    deadline = time.perf_counter() + 30
    while not settled():
        if time.perf_counter() > deadline:
            raise SystemExit("handled messages were not all acknowledged within 30 s")
        time.sleep(0.0005)
    return max(sink.last, time.perf_counter())


def measure(publish: Callable[[dict[str, Any]], Any], sink_box: list[Sink], messages: int,
            paced: int, settled: Callable[[], bool] | None = None) -> dict[str, float]:
    """Throughput: publish ``messages`` as fast as possible and wait for all (and, on Redis, their
    acks). Latency: ``paced`` messages at 200/s, so queues stay short and the figure is the path,
    not the backlog."""
    sink = sink_box[0] = Sink(messages)
    cpu_started = time.process_time()
    started = time.perf_counter()
    for _ in range(messages):
        publish({"t": time.perf_counter()})
    published = time.perf_counter()
    if not sink.done.wait(300):
        raise SystemExit(f"only {len(sink.latencies)} of {messages} messages arrived")
    throughput = messages / (settle(sink, settled) - started)
    # Publisher, consumers and workers share this process: its CPU per message is the figure
    # least at the mercy of other load on a shared machine.
    cpu_us = (time.process_time() - cpu_started) / messages * 1e6
    sink = sink_box[0] = Sink(paced)
    for _ in range(paced):
        publish({"t": time.perf_counter()})
        time.sleep(0.005)
    if not sink.done.wait(120):
        raise SystemExit("paced messages did not all arrive")
    ordered = sorted(sink.latencies)
    return {
        "publish_per_s": messages / (published - started),
        "throughput_per_s": throughput,
        "cpu_us_per_message": cpu_us,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000,
    }


def run_immutant(home: Path, threads: int, messages: int, paced: int, broker_url: str | None) -> dict[str, float]:
    app = Flask("bench")
    app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=f"bench{uuid.uuid4().hex[:6]}",
                      IMMUTANT_WORKER_THREADS=threads, IMMUTANT_BROKER_URL=broker_url,
                      # Like for like: raw Dramatiq makes no spans. With the test extra installed,
                      # tracing's default ("auto") would be on; observability.py measures its cost.
                      IMMUTANT_TRACING="off")
    ImmutantExtension(app)
    messaging = messaging_for(app)
    box: list[Sink] = [Sink(0)]
    messaging.listen("/queue/bench", lambda body: box[0](body))
    state = messaging.state
    runtime = SimpleNamespace(app=app, state=state, settings=state.settings)
    state.runtime = runtime  # type: ignore[assignment]
    messaging.runtime_started(runtime)  # type: ignore[arg-type]
    try:
        time.sleep(0.5)
        queue = messaging.destinations["/queue/bench"].queue_name
        settled = None if broker_url else acknowledged(state.store, messages_hash(messaging.backend, queue))
        return measure(lambda body: messaging.publish("/queue/bench", body), box, messages, paced, settled)
    finally:
        messaging.runtime_stopping(runtime)  # type: ignore[arg-type]
        # each run's cluster name is new: its queues would stay on a shared RabbitMQ for good
        messaging.backend.delete_queue(messaging.publisher, messaging.destinations["/queue/bench"].queue_name)


def run_raw(url: str, threads: int, poll_ms: int, messages: int, paced: int,
            broker_url: str | None) -> dict[str, float]:
    box: list[Sink] = [Sink(0)]
    queue = f"raw{uuid.uuid4().hex[:6]}"
    if broker_url:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        # The same queue arguments as flask-immutant's (priorities 0..9), so the broker does the same work.
        broker: Any = RabbitmqBroker(url=broker_url, middleware=[Retries()], confirm_delivery=True, max_priority=9)
    else:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(client=client_from_url(url), namespace=f"bench-{queue}", middleware=[Retries()])
    publisher = broker

    def handle(body: dict[str, Any]) -> None:
        box[0](body)

    actor: Any = dramatiq.Actor(handle, broker=broker, actor_name="handle", queue_name=queue, priority=0, options={})
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=poll_ms)
    worker.start()
    try:
        time.sleep(0.5)
        settled = None if broker_url else acknowledged(broker.client, messages_hash(broker, queue))
        return measure(lambda body: publisher.enqueue(actor.message(body)), box, messages, paced, settled)
    finally:
        worker.stop()
        if broker_url:
            broker.channel.queue_delete(queue=queue)
        broker.close()


def compare(home: Path, url: str, args: argparse.Namespace, broker_url: str | None) -> None:
    label = "RabbitMQ" if broker_url else "Redis"
    poll_ms = int(min(1000, max(50, 2.0 / 8 * 2000)))  # what the engine uses at the default timeout
    # Alternate the two, twice, so neither always runs on a warmer machine.
    results: dict[str, list[dict[str, float]]] = {"immutant": [], "raw": []}
    for _round in range(args.rounds):
        results["raw"].append(run_raw(url, args.threads, poll_ms, args.messages, args.paced, broker_url))
        results["immutant"].append(run_immutant(home, args.threads, args.messages, args.paced, broker_url))
    print(f"\n== {label}: {args.messages} messages, {args.threads} worker threads, best of {args.rounds} ==")
    best = {name: max(runs, key=lambda r: r["throughput_per_s"]) for name, runs in results.items()}
    for name, figures in best.items():
        print(f"{name:>9}: publish {figures['publish_per_s']:8.0f}/s  publish+consume "
              f"{figures['throughput_per_s']:8.0f}/s  latency p50 {figures['p50_ms']:6.2f} ms  "
              f"p99 {figures['p99_ms']:6.2f} ms")
    cpu = {name: statistics.median(r["cpu_us_per_message"] for r in runs) for name, runs in results.items()}
    print(f"    CPU per message (median of rounds): flask-immutant {cpu['immutant']:.0f} us, "
          f"raw Dramatiq {cpu['raw']:.0f} us (ratio {cpu['raw'] / cpu['immutant']:.3f})")
    ratio = best["immutant"]["throughput_per_s"] / best["raw"]["throughput_per_s"]
    print(f"    ratio (flask-immutant / raw Dramatiq throughput): {ratio:.3f}  (target >= 1.0)")
    # Each round runs the two back to back: the median of their ratios is less at the mercy of one
    # quiet (or busy) moment than the ratio of the two bests.
    paired = [ours["throughput_per_s"] / raw["throughput_per_s"]
              for ours, raw in zip(results["immutant"], results["raw"], strict=True)]
    print(f"    per-round ratios: {', '.join(f'{r:.3f}' for r in paired)}; median {statistics.median(paired):.3f}")


def drain_backlog(home: Path, url: str, args: argparse.Namespace, broker_url: str | None) -> None:
    """A backlog of ``--backlog`` messages, queued before any consumer starts, drained by one
    runtime (8 threads): flask-immutant vs raw Dramatiq, alternating. Here the worker threads
    finish messages faster than one at a time, so per-message costs of the consumer show (on
    RabbitMQ, acks handed to the consumer connection in batches)."""
    label = "RabbitMQ" if broker_url else "Redis"
    n = args.backlog
    results: dict[str, list[tuple[float, float]]] = {"immutant": [], "raw": []}
    for _round in range(args.rounds):
        results["raw"].append(_drain_raw(url, args.threads, n, broker_url))
        results["immutant"].append(_drain_immutant(home, args.threads, n, broker_url))
    print(f"\n== {label}: drain a backlog of {n} messages, {args.threads} worker threads, {args.rounds} rounds ==")
    for name, runs in results.items():
        print(f"{name:>9}: " + ", ".join(f"{rate:6.0f}/s {cpu:4.0f} us" for rate, cpu in runs)
              + "  (messages per second, CPU per message)")
    paired = [ours[0] / raw[0] for ours, raw in zip(results["immutant"], results["raw"], strict=True)]
    print(f"    per-round ratios: {', '.join(f'{r:.3f}' for r in paired)}; median {statistics.median(paired):.3f}")


def _drained(sink: Sink, started: float, cpu_started: float, n: int,
             settled: Callable[[], bool] | None) -> tuple[float, float]:
    if not sink.done.wait(300):
        raise SystemExit(f"only {len(sink.latencies)} of {n} backlog messages arrived")
    return n / (settle(sink, settled) - started), (time.process_time() - cpu_started) / n * 1e6


def _drain_immutant(home: Path, threads: int, n: int, broker_url: str | None) -> tuple[float, float]:
    app = Flask("bench-backlog")
    app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=f"benchd{uuid.uuid4().hex[:6]}",
                      IMMUTANT_WORKER_THREADS=threads, IMMUTANT_BROKER_URL=broker_url, IMMUTANT_TRACING="off")
    ImmutantExtension(app)
    messaging = messaging_for(app)
    sink = Sink(n)
    messaging.listen("/queue/backlog", sink)
    for start in range(0, n, 500):
        messaging.publish_many("/queue/backlog", [{"t": 0.0}] * min(500, n - start))
    state = messaging.state
    runtime = SimpleNamespace(app=app, state=state, settings=state.settings)
    state.runtime = runtime  # type: ignore[assignment]
    cpu_started, started = time.process_time(), time.perf_counter()
    messaging.runtime_started(runtime)  # type: ignore[arg-type]
    queue = messaging.destinations["/queue/backlog"].queue_name
    settled = None if broker_url else acknowledged(state.store, messages_hash(messaging.backend, queue))
    try:
        return _drained(sink, started, cpu_started, n, settled)
    finally:
        messaging.runtime_stopping(runtime)  # type: ignore[arg-type]
        messaging.backend.delete_queue(messaging.publisher, messaging.destinations["/queue/backlog"].queue_name)


def _drain_raw(url: str, threads: int, n: int, broker_url: str | None) -> tuple[float, float]:
    queue = f"rawd{uuid.uuid4().hex[:6]}"
    if broker_url:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker: Any = RabbitmqBroker(url=broker_url, middleware=[Retries()], confirm_delivery=True, max_priority=9)
    else:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(client=client_from_url(url), namespace=f"bench-{queue}", middleware=[Retries()])
    sink = Sink(n)
    actor: Any = dramatiq.Actor(sink, broker=broker, actor_name="handle", queue_name=queue, priority=0, options={})
    for _ in range(n):
        broker.enqueue(actor.message({"t": 0.0}))
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=500)
    cpu_started, started = time.process_time(), time.perf_counter()
    worker.start()
    settled = None if broker_url else acknowledged(broker.client, messages_hash(broker, queue))
    try:
        return _drained(sink, started, cpu_started, n, settled)
    finally:
        worker.stop()
        if broker_url:
            broker.channel.queue_delete(queue=queue)
        broker.close()


def batch_vs_single(home: Path, args: argparse.Namespace, broker_url: str | None) -> None:
    """``publish_many`` of N messages vs N ``publish`` calls, publishing only (nobody consumes)."""
    label = "RabbitMQ" if broker_url else "Redis"
    app = Flask("bench-batch")
    app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=f"benchb{uuid.uuid4().hex[:6]}",
                      IMMUTANT_BROKER_URL=broker_url)
    ImmutantExtension(app)
    messaging = messaging_for(app)
    destination = messaging.start("/queue/batch")
    n = args.batch
    bodies = [{"n": i, "t": 0.0} for i in range(n)]
    messaging.publish_many("/queue/batch", bodies[:2])  # connect, declare, load the script
    single: list[float] = []
    batch: list[float] = []
    for _round in range(args.batch_rounds):  # interleaved, so both see the same machine
        started = time.perf_counter()
        for body in bodies:
            messaging.publish("/queue/batch", body)
        single.append(time.perf_counter() - started)
        started = time.perf_counter()
        messaging.publish_many("/queue/batch", bodies)
        batch.append(time.perf_counter() - started)
    messaging.backend.delete_queue(messaging.publisher, destination.queue_name)
    messaging.publisher.close()
    one, many = statistics.median(single), statistics.median(batch)
    print(f"\n== {label}: publish_many of {n} vs {n} single publishes, median of {args.batch_rounds} rounds ==")
    print(f"   {n} x publish: {one * 1000:8.2f} ms ({n / one:8.0f}/s)   publish_many: {many * 1000:8.2f} ms "
          f"({n / many:8.0f}/s)")
    print(f"    ratio (publish_many / single publishes, messages per second): {one / many:.1f}x  (target >= 5x)")


APP = r'''
import os, sys, time
from flask import Flask
from flask_immutant import ImmutantExtension, messaging

app = Flask("bench_app")
ImmutantExtension(app)
NODE = os.environ.get("IMMUTANT_NODE_NAME")

def work(body):
    if NODE == "victim":
        sys.stdout.write(f"holding {body}\n"); sys.stdout.flush()
        time.sleep(600)
    sys.stdout.write(f"handled {body} at {time.time():.4f}\n"); sys.stdout.flush()

messaging.listen("/queue/held", work, app=app)
'''


class Node:
    def __init__(self, name: str, offset: int, env: dict[str, str], folder: Path) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "bench_app", "immutant", "run", "--clustered",
             "--node-name", name, "--port-offset", str(offset)],
            env=env, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while sum(bool(re.search(pattern, line)) for line in list(self.lines)) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {pattern!r}:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redelivery(home: Path, args: argparse.Namespace, broker_url: str | None) -> None:
    label = "RabbitMQ" if broker_url else "Redis"
    folder = Path(tempfile.mkdtemp(prefix="imt-bench-app-"))
    (folder / "bench_app.py").write_text(APP)
    times = []
    lost_total = 0
    for run in range(args.kills):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
        env.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=f"benchkill{run}{uuid.uuid4().hex[:4]}",
                   IMMUTANT_HTTP_PORT=str(free_port() // 2 + 1000), IMMUTANT_FAILURE_TIMEOUT=str(args.failure_timeout),
                   PYTHONUNBUFFERED="1")
        if broker_url:
            env["IMMUTANT_BROKER_URL"] = broker_url
        app = Flask("bench-publisher")
        app.config.update({k: v for k, v in env.items() if k.startswith("IMMUTANT_") and k != "IMMUTANT_HTTP_PORT"})
        ImmutantExtension(app)
        messaging = messaging_for(app)
        held = messaging.start("/queue/held")
        victim = Node("victim", 0, env, folder)
        survivor = None
        try:
            victim.wait_for("messaging: consuming /queue/held")
            for n in range(args.held):
                messaging.publish("/queue/held", n)
            victim.wait_for("^holding ", args.held)
            survivor = Node("survivor", 100, env, folder)
            survivor.wait_for("messaging: consuming /queue/held")
            killed = time.time()
            os.killpg(victim.proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + args.failure_timeout + 30
            while time.monotonic() < deadline:
                done = [float(m.group(1)) for line in list(survivor.lines)
                        if (m := re.search(r"^handled .* at ([\d.]+)$", line))]
                if len(done) >= args.held:
                    break
                time.sleep(0.01)
            lost_total += args.held - len(done)
            if done:
                times.append(max(done) - killed)
        finally:
            victim.stop()
            if survivor is not None:
                survivor.stop()
            messaging.backend.delete_queue(messaging.publisher, held.queue_name)
    print(f"\n== {label}: redelivery after SIGKILL of a node holding {args.held} unacked messages, "
          f"no other traffic, failure timeout {args.failure_timeout:g} s, {args.kills} runs ==")
    print(f"    all redelivered after: median {statistics.median(times):.2f} s, max {max(times):.2f} s; "
          f"lost {lost_total}  (target <= {args.failure_timeout + 1:g} s, 0 lost)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--paced", type=int, default=500)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--held", type=int, default=5)
    parser.add_argument("--failure-timeout", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=100, help="messages per publish_many (0: skip)")
    parser.add_argument("--batch-rounds", type=int, default=20)
    parser.add_argument("--only-batch", action="store_true", help="only publish_many vs single publishes")
    parser.add_argument("--rabbitmq", default=None, help="also compare on this RabbitMQ (amqp:// URL)")
    parser.add_argument("--backlog", type=int, default=5000, help="messages of the backlog drain (0: skip)")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    home = Path(tempfile.mkdtemp(prefix="imt-bench-"))
    store = EmbeddedStore(home)
    url = store.ensure_running()
    try:
        if args.batch:
            batch_vs_single(home, args, None)
            if args.rabbitmq:
                batch_vs_single(home, args, args.rabbitmq)
        if args.only_batch:
            return
        compare(home, url, args, None)
        if args.rabbitmq:
            compare(home, url, args, args.rabbitmq)
        if args.backlog:
            drain_backlog(home, url, args, None)
            if args.rabbitmq:
                drain_backlog(home, url, args, args.rabbitmq)
        if args.kills:
            redelivery(home, args, None)
        if args.rabbitmq and args.kills:
            redelivery(home, args, args.rabbitmq)
    finally:
        store.stop()


if __name__ == "__main__":
    main()
