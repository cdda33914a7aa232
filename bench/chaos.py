"""A bounded chaos soak on separate hosts (network namespaces) with a Sentinel-managed store.

    sudo python bench/chaos.py [--seconds 180] [--seed 1] [--failure-timeout 2.0] [--lease-replicas 1]

Builds the multi-host harness of the tests (tests/multihost.py: three node hosts, a Redis primary,
two replicas and three Sentinels, the recommended store settings of docs/guarantees.md), deploys
the fenced test app by archive, publishes a number every 20 ms from outside, and until the time is
up injects one fault after another at random: SIGKILL a node (restarted later), SIGSTOP a node past
the failure timeout, SIGKILL the Redis primary (restarted later as a replica), cut a node off,
cut the primary off together with the daemon's node. Then it prints acknowledged, lost and
duplicated messages, the overlap seconds of the singleton (from the fencing token the daemon
writes with every effect), failover times of the daemon and recovery after each store failover.
Targets: 0 lost, 0 overlap. ``--lease-replicas 0`` shows what the WAIT confirmation buys.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from multihost import (
    Cluster,
    Publisher,
    namespaces_unavailable,
    overlap_seconds,
    running_cluster,
    stale_effects,
    tenures,
)

from support import wait_until

FAULTS = ("kill_node", "stop_node", "kill_primary", "cut_node", "split_brain")


class Chaos:
    def __init__(self, cluster: Cluster, publisher: Publisher, rng: random.Random) -> None:
        self.cluster = cluster
        self.publisher = publisher
        self.rng = rng
        self.failovers: list[float] = []
        self.store_recoveries: list[tuple[float, float]] = []  # (promotion, first message handled after)
        self.counts: Counter[str] = Counter()

    def holder(self) -> str | None:
        return self.cluster.acting(since=time.time() - 0.5)

    def measure_failover(self, loser: str | None, since: float, timeout: float = 30.0) -> None:
        """If ``loser`` held the daemon, the time until another host made an effect."""
        if loser is None:
            return
        try:
            first = wait_until(lambda: next((at for _, at, host in self.cluster.effects()
                                             if at > since and host != loser), None), timeout=timeout)
        except AssertionError:
            print(f"    daemon did not move off {loser} within {timeout:.0f} s")
            return
        self.failovers.append(first - since)
        print(f"    daemon failover off {loser}: {first - since:.2f} s")

    def run(self, fault: str) -> None:
        self.counts[fault] += 1
        getattr(self, fault)()
        self.settle()

    def settle(self) -> None:
        """Before the next fault: one primary with both replicas, and the daemon running."""
        store = self.cluster.store
        try:
            wait_until(lambda: (p := store.primary()) is not None and store.replicas_of(p) == 2, timeout=60,
                       interval=0.2)
            wait_until(self.holder, timeout=30, interval=0.2)
        except AssertionError as exc:
            print(f"    not settled: {exc}")

    def _victim(self) -> str:
        holder = self.holder()
        names = list(self.cluster.hosts)
        return holder if holder and self.rng.random() < 0.6 else self.rng.choice(names)

    def kill_node(self) -> None:
        victim, holder = self._victim(), self.holder()
        print(f"  SIGKILL node {victim}{' (holder)' if victim == holder else ''}")
        at = time.time()
        self.cluster.nodes[victim].signal(signal.SIGKILL)
        self.measure_failover(victim if victim == holder else None, at)
        self.cluster.nodes[victim].cleanup()
        time.sleep(self.rng.uniform(1, 3))
        self.cluster.start_node(victim).wait_for(r"node \S+ joined cluster", timeout=60)

    def stop_node(self) -> None:
        victim, holder = self._victim(), self.holder()
        pause = self.cluster.failure_timeout * self.rng.uniform(1.5, 3)
        print(f"  SIGSTOP node {victim}{' (holder)' if victim == holder else ''} for {pause:.1f} s")
        at = time.time()
        group = self.cluster.nodes[victim].pid  # the node and its app runtimes: the whole host stalls
        os.killpg(group, signal.SIGSTOP)
        try:
            self.measure_failover(victim if victim == holder else None, at, timeout=pause + 10)
            time.sleep(max(0.0, at + pause - time.time()))
        finally:
            os.killpg(group, signal.SIGCONT)

    def kill_primary(self) -> None:
        store = self.cluster.store
        old = store.primary()
        if old is None:
            return
        print(f"  SIGKILL Redis primary {old.name}")
        at = time.time()
        store.kill(old.name)
        self._after_store_failover(old, at)
        new = wait_until(store.primary, timeout=60, message="a primary")
        store.start_server(old.name, replica_of=new)

    def cut_node(self) -> None:
        victim, holder = self._victim(), self.holder()
        length = self.cluster.failure_timeout * self.rng.uniform(1.5, 4)
        print(f"  cut node {victim}{' (holder)' if victim == holder else ''} off for {length:.1f} s")
        host = self.cluster.hosts[victim]
        at = time.time()
        self.cluster.network.cut(host)
        try:
            self.measure_failover(victim if victim == holder else None, at, timeout=length + 10)
            time.sleep(max(0.0, at + length - time.time()))
        finally:
            self.cluster.network.heal(host)

    def split_brain(self) -> None:
        store = self.cluster.store
        old, holder = store.primary(), self.holder()
        if old is None or holder is None:
            return
        print(f"  cut Redis primary {old.name} off together with the holder {holder}")
        hosts = (old, self.cluster.hosts[holder])
        at = time.time()
        self.cluster.network.island(*hosts)
        try:
            self._after_store_failover(old, at)
            self.measure_failover(holder, at)
            time.sleep(self.cluster.failure_timeout)
        finally:
            self.cluster.network.heal(*hosts)

    def _after_store_failover(self, old: object, at: float) -> None:
        store = self.cluster.store
        try:
            new = wait_until(lambda: (p := store.primary()) is not None and p != old and p, timeout=30)
        except AssertionError:
            print("    no promotion within 30 s")
            return
        promoted = time.time()
        try:
            wait_until(lambda: any(t > promoted and n in set(self.cluster.received())
                                   for n, t in self.publisher.acknowledged), timeout=30, interval=0.02)
        except AssertionError:
            print(f"    {new.name} promoted after {promoted - at:.2f} s; no message handled within 30 s after it")
            return
        flowing = time.time() - promoted
        self.store_recoveries.append((promoted - at, flowing))
        print(f"    {new.name} promoted after {promoted - at:.2f} s; messages handled again {flowing:.2f} s later")


def summary(values: list[float]) -> str:
    if not values:
        return "none"
    return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s, n={len(values)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="How long to inject faults.")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--failure-timeout", type=float, default=2.0)
    parser.add_argument("--lease-replicas", type=int, default=1)
    args = parser.parse_args()
    reason = namespaces_unavailable()
    if reason:
        sys.exit(f"Error: the chaos soak needs network namespaces: {reason}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    started = time.time()
    with running_cluster(failure_timeout=args.failure_timeout, lease_replicas=args.lease_replicas) as cluster:
        print(f"cluster up in {time.time() - started:.1f} s; seed {seed}; faults for {args.seconds:.0f} s")
        publisher = Publisher(cluster.env).start()
        chaos = Chaos(cluster, publisher, rng)
        deadline = time.monotonic() + args.seconds
        faults: list[str] = []
        try:
            while time.monotonic() < deadline:
                if not faults:  # every kind of fault once per round, in a random order
                    faults = rng.sample(FAULTS, len(FAULTS))
                time.sleep(rng.uniform(2, 5))
                chaos.run(faults.pop())
            time.sleep(3)
        finally:
            publisher.stop()
        acknowledged = {n for n, _ in publisher.acknowledged}
        try:
            wait_until(lambda: acknowledged <= set(cluster.received()), timeout=60)
        except AssertionError:
            pass
        received = Counter(cluster.received())
        lost = sorted(acknowledged - set(received))
        duplicated = sum(c - 1 for c in received.values() if c > 1)
        effects = cluster.effects()
        print(f"\n{args.seconds:.0f} s of faults ({', '.join(f'{k} x{v}' for k, v in sorted(chaos.counts.items()))}), "
              f"failure timeout {args.failure_timeout:g} s, IMMUTANT_LEASE_REPLICAS={args.lease_replicas}")
        print(f"messages: {len(acknowledged)} acknowledged, {publisher.failed} refused while the store was "
              f"away, {len(lost)} lost{' ' + str(lost[:20]) if lost else ''}, {duplicated} duplicated")
        print(f"singleton: {len(tenures(effects))} tenures, overlap {overlap_seconds(effects):.3f} s (target 0), "
              f"{stale_effects(effects)} stale effects (older fencing token after a newer one acted: a receiver "
              "checking tokens rejects them)")
        print(f"daemon failover after a fault on its node: {summary(chaos.failovers)}")
        promotions = [p for p, _ in chaos.store_recoveries]
        flowing = [f for _, f in chaos.store_recoveries]
        print(f"store failover: promotion {summary(promotions)}; messages handled again after promotion "
              f"{summary(flowing)}")


if __name__ == "__main__":
    main()
