"""Leases on a real redis-server: fencing tokens, release, renewal failure, contenders."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flask_immutant import portable
from flask_immutant.cluster.lease import (
    POLLS_PER_TTL,
    SAFETY_MARGIN,
    LeaseKeeper,
    LeaseManager,
    holder_is_dead,
    read_holder,
    release_dead_holders,
)
from flask_immutant.keys import Keys
from flask_immutant.store.embedded import redis_server_binary

from support import REFUSALS, store_refusing, wait_until

TTL = 1.0


class Recorder:
    """Callbacks of one keeper, with the times they were called."""

    def __init__(self) -> None:
        self.acquired: list[tuple[float, int]] = []
        self.lost: list[float] = []
        self.event = threading.Event()

    def on_acquired(self, fence: int) -> None:
        self.acquired.append((time.monotonic(), fence))
        self.event.set()

    def on_lost(self) -> None:
        self.lost.append(time.monotonic())


@pytest.fixture
def managers(embedded_store, cluster_name) -> Iterator[list[LeaseManager]]:
    made = [LeaseManager(embedded_store.url, Keys(cluster_name), f"node{i}", TTL) for i in range(2)]
    try:
        yield made
    finally:
        for manager in made:
            manager.close()


def test_one_holder_at_a_time_and_tokens_increase(managers, store_client, cluster_name):
    # Given two contenders for one lease
    a, b = Recorder(), Recorder()
    keeper_a = managers[0].keeper("job", a.on_acquired, a.on_lost)
    wait_until(lambda: keeper_a.held, timeout=2)
    keeper_b = managers[1].keeper("job", b.on_acquired, b.on_lost)
    # Then only the first holds it, for as long as it renews
    time.sleep(TTL * 2)  # several renewal periods: b must not get it meanwhile
    assert keeper_a.held and not keeper_b.held and not b.acquired
    holder = read_holder(store_client, Keys(cluster_name), "job")
    assert holder is not None and holder.node == "node0" and holder.fence == keeper_a.fence
    # When the holder releases, the contender takes over at once with a larger token
    released = time.monotonic()
    keeper_a.stop(release=True)
    wait_until(lambda: keeper_b.held, timeout=TTL)
    assert b.acquired[0][0] - released < TTL / 2  # woken by the release, not by expiry
    assert b.acquired[0][1] > a.acquired[0][1]
    assert a.lost  # the holder's work was stopped before it let go


def test_tokens_increase_even_if_the_store_lost_the_counter(managers, store_client, cluster_name):
    keys = Keys(cluster_name)
    a = Recorder()
    keeper = managers[0].keeper("fenced", a.on_acquired, a.on_lost)
    wait_until(lambda: keeper.held, timeout=2)
    first = keeper.fence
    keeper.stop(release=True)
    store_client.delete(keys.lease_fence("fenced"))  # as if the AOF lost its last second
    keeper2 = managers[1].keeper("fenced", a.on_acquired, a.on_lost)
    wait_until(lambda: keeper2.held, timeout=2)
    assert keeper2.fence is not None and first is not None and keeper2.fence > first


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    sock = tmp_path / "r.sock"
    proc = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, timeout=10)
        yield f"unix://{sock}", proc
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_that_cannot_renew_stops_before_its_lease_can_expire(private_redis, cluster_name):
    url, proc = private_redis
    manager = LeaseManager(url, Keys(cluster_name), "lonely", TTL)
    try:
        a = Recorder()
        keeper = manager.keeper("job", a.on_acquired, a.on_lost)
        wait_until(lambda: keeper.held, timeout=2)
        # When the store stops answering (the process is frozen, so connections hang)
        os.kill(proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            # Then the holder stops its work before the TTL from its last renewal runs out
            wait_until(lambda: a.lost, timeout=TTL * 2)
            assert a.lost[0] - frozen < TTL
            assert not keeper.valid()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        manager.close()


@pytest.mark.parametrize("reply", REFUSALS)
def test_a_holder_whose_store_refuses_to_renew_stops_before_its_lease_can_expire(private_redis, cluster_name,
                                                                                  reply):
    url, _ = private_redis
    manager = LeaseManager(url, Keys(cluster_name), "refused", TTL)
    try:
        a = Recorder()
        keeper = manager.keeper("job", a.on_acquired, a.on_lost)
        wait_until(lambda: keeper.held, timeout=2)
        # When the store answers renewals with an outage reply (no replicas, demoted, busy)
        with store_refusing(url.removeprefix("unix://"), reply):
            refused = time.monotonic()
            # Then the holder stops its work before the TTL from its last renewal runs out
            wait_until(lambda: a.lost, timeout=TTL * 2)
            assert a.lost[0] - refused < TTL
            assert not keeper.valid()
    finally:
        manager.close()


def test_valid_ends_at_the_local_deadline(managers):
    a = Recorder()
    keeper = managers[0].keeper("deadline", a.on_acquired, a.on_lost)
    wait_until(lambda: keeper.held, timeout=2)
    assert keeper.valid()
    assert 0 < SAFETY_MARGIN < 0.5


def test_step_aside_lets_another_contender_in(managers):
    a, b = Recorder(), Recorder()
    keeper_a = managers[0].keeper("shy", a.on_acquired, a.on_lost)
    wait_until(lambda: keeper_a.held, timeout=2)
    keeper_b = managers[1].keeper("shy", b.on_acquired, b.on_lost)
    keeper_a.step_aside(30)
    wait_until(lambda: keeper_b.held, timeout=2)
    assert not keeper_a.held and a.lost


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server primary with one replica on loopback TCP; yields the primary's URL and the
    replica's process (the test may freeze or kill it)."""
    from support import free_port_base

    started: list[subprocess.Popen[bytes]] = []
    primary_port = free_port_base(span=100)
    replica_port = primary_port + 100
    try:
        for name, port, extra in (("p", primary_port, []), ("r", replica_port, ["--replicaof", "127.0.0.1",
                                                                                 str(primary_port)])):
            folder = tmp_path / name
            folder.mkdir()
            started.append(subprocess.Popen(
                [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                 "--appendonly", "no", "--dir", str(folder), "--repl-diskless-sync-delay", "0", *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import redis

        primary = redis.Redis(port=primary_port)
        try:
            wait_until(lambda: _connected_replicas(primary) == 1, timeout=10, message="replica attached")
        finally:
            primary.close()
        yield f"redis://127.0.0.1:{primary_port}", started[1]
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def _connected_replicas(client: object) -> int:
    """Replicas that finished their first sync (a replica still loading acknowledges no WAIT)."""
    import redis

    try:
        info = client.info("replication")  # type: ignore[attr-defined]
    except redis.RedisError:
        return 0
    replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    return sum(1 for replica in replicas if replica.get("state") == "online")


def test_a_confirmed_lease_is_held_and_renewed_through_a_replica(primary_and_replica, cluster_name):
    url, _replica = primary_and_replica
    manager = LeaseManager(url, Keys(cluster_name), "confirmed", TTL, replicas=1)
    try:
        a = Recorder()
        keeper = manager.keeper("job", a.on_acquired, a.on_lost)
        wait_until(lambda: keeper.held, timeout=2)
        time.sleep(TTL * 2)  # several renewals, each confirmed by WAIT
        assert keeper.valid() and not a.lost
    finally:
        manager.close()


def test_a_holder_whose_renewals_no_replica_confirms_stops_before_its_lease_can_expire(
        primary_and_replica, cluster_name):
    # Given a holder that needs one replica to confirm each renewal
    url, replica = primary_and_replica
    manager = LeaseManager(url, Keys(cluster_name), "unconfirmed", TTL, replicas=1)
    try:
        a = Recorder()
        keeper = manager.keeper("job", a.on_acquired, a.on_lost)
        wait_until(lambda: keeper.held, timeout=2)
        # When the replica stops confirming (frozen), while the primary still accepts the writes
        os.kill(replica.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        # Then the holder stops its work within the lease's margin, as if the store were gone
        wait_until(lambda: a.lost, timeout=TTL * 2)
        assert a.lost[0] - frozen < TTL
        assert not keeper.valid()
        # And while no replica confirms, no contender acts on an acquisition either
        b = Recorder()
        contender = manager.keeper("other", b.on_acquired, b.on_lost)
        time.sleep(TTL)
        assert not contender.held and not b.acquired
        # When the replica confirms again, the contender acquires and acts
        os.kill(replica.pid, signal.SIGCONT)
        wait_until(lambda: contender.held and contender.valid(), timeout=TTL * 4)
        assert b.acquired
    finally:
        os.kill(replica.pid, signal.SIGCONT)
        manager.close()


linux_only = pytest.mark.skipif(not portable.linux_extras(), reason="the lock files live in Linux's /dev/shm")


def lock_holder() -> tuple[subprocess.Popen[bytes], str]:
    """A process of this machine holding its lock file, as a lease holder does; and the file's name."""
    code = ("from flask_immutant import portable; import time\n"
            "print(portable.own_lock('holder'), flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc, lock = lock_holder()
    proc.lock = lock  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        portable.remove_abandoned_lock(lock)


def plant_holder(store, keys: Keys, name: str, holder: subprocess.Popen[bytes], ttl: float,
                 record_ttl: float = TTL, **fields: object) -> dict[str, object]:
    """Write the lease record (and last-holder record) ``holder`` would have written, with ``ttl``
    left on its key, as if it held ``name`` (with its own TTL ``record_ttl``) and had not released it."""
    pid = holder.pid
    record: dict[str, object] = {"owner": f"planted|{pid}|{uuid.uuid4().hex}", "fence": 1, "node": "planted",
                                 "pid": pid, "pidns": portable.pid_namespace(), "since": time.time(),
                                 "lock": getattr(holder, "lock", None),
                                 "ttl": int(record_ttl * 1000), **fields}
    store.set(keys.lease(name), json.dumps(record), px=int(ttl * 1000))
    store.set(keys.lease_last(name), json.dumps(record))
    store.set(keys.lease_fence(name), "1")
    return record


@linux_only
def test_a_holder_proven_dead_on_this_host_is_replaced_before_its_key_expires(managers, store_client, cluster_name,
                                                                               sleeper):
    # Given two leases held, with a long TTL, by a process of this host that was then SIGKILLed
    keys = Keys(cluster_name)
    for name in ("crashed", "crashed-too"):
        plant_holder(store_client, keys, name, sleeper, ttl=60)
    sleeper.kill()
    sleeper.wait()
    # When a contender of this host polls them
    a = Recorder()
    keepers = [managers[0].keeper(name, a.on_acquired, a.on_lost) for name in ("crashed", "crashed-too")]
    wait_until(lambda: all(k.held for k in keepers), timeout=10)
    # Then it took both over while the dead holder's keys still had most of their minute (the
    # first takeover left the lock file for the second proof)
    for name in ("crashed", "crashed-too"):
        holder = read_holder(store_client, keys, name)
        assert holder is not None and holder.node == "node0" and holder.fence > 1
        assert json.loads(store_client.get(keys.lease_last(name)))["node"] == "node0"
    # And the dead holder's lock file is removed once its leases could all have expired
    wait_until(lambda: not (portable.LOCK_DIR / sleeper.lock).exists(), timeout=TTL * 3)


@linux_only
def test_a_holder_not_proven_dead_is_left_to_its_ttl(managers, store_client, cluster_name, sleeper):
    # Given leases held by a process that is stopped (alive: it will run its stop rule when it
    # resumes), by a dead process whose record names no lock file, and by one whose lock file is
    # not on this machine (another host, or a clone of this one restored from a memory snapshot)
    keys = Keys(cluster_name)
    stopped = plant_holder(store_client, keys, "stopped", sleeper, ttl=60)
    os.kill(sleeper.pid, signal.SIGSTOP)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = plant_holder(store_client, keys, "old", dead, ttl=60)
    far = plant_holder(store_client, keys, "far", dead, ttl=60, lock=f"flask-immutant-{uuid.uuid4().hex}.lock")
    # When contenders poll them many times
    a, b, c = Recorder(), Recorder(), Recorder()
    keepers = [managers[0].keeper("stopped", a.on_acquired, a.on_lost),
               managers[1].keeper("old", b.on_acquired, b.on_lost),
               managers[0].keeper("far", c.on_acquired, c.on_lost)]
    time.sleep(TTL * 2)  # 16 polls each
    # Then no holder is displaced
    assert not any(k.held for k in keepers) and not a.acquired and not b.acquired and not c.acquired
    for name, record in (("stopped", stopped), ("old", old), ("far", far)):
        assert json.loads(store_client.get(keys.lease(name)))["owner"] == record["owner"]
    assert (portable.LOCK_DIR / sleeper.lock).exists()


@linux_only
def test_a_supervisor_releases_the_leases_of_dead_holders_only(store_client, cluster_name, sleeper, dead):
    # Given two leases held by a dead process of this host, one by a live one, and one whose lock
    # file is not on this machine
    keys = Keys(cluster_name)
    lock = dead.lock
    plant_holder(store_client, keys, "daemon:gone", dead, ttl=60)
    plant_holder(store_client, keys, "job:gone", dead, ttl=60)
    plant_holder(store_client, keys, "daemon:live", sleeper, ttl=60)
    plant_holder(store_client, keys, "daemon:far", dead, ttl=60, lock=f"flask-immutant-{uuid.uuid4().hex}.lock")
    wakeups = store_client.pubsub()
    wakeups.subscribe(keys.lease_released)
    try:
        wait_until(lambda: wakeups.get_message(timeout=0.1), timeout=5)  # the subscription is live
        # When the sweep runs
        released = release_dead_holders(store_client, keys)
        # Then only the dead holder's leases are gone, its contenders are woken, and the next
        # acquisition will be reported as a failover (its last-holder record stays)
        assert sorted(released) == ["daemon:gone", "job:gone"]
        assert store_client.get(keys.lease("daemon:gone")) is None
        assert store_client.get(keys.lease_last("daemon:gone")) is not None
        assert store_client.get(keys.lease("daemon:live")) and store_client.get(keys.lease("daemon:far"))
        messages = [wait_until(lambda: wakeups.get_message(timeout=0.1), timeout=5) for _ in range(2)]
        assert sorted(m["data"] for m in messages) == [b"daemon:gone", b"job:gone"]
        # And its lock file, which has proven all it can, is gone; the live holder's stays
        assert not (portable.LOCK_DIR / lock).exists() and (portable.LOCK_DIR / sleeper.lock).exists()
    finally:
        wakeups.close()


def dead_lock_holder() -> subprocess.Popen[bytes]:
    """A process of this machine that held its lock file and was SIGKILLed (``.lock``: the file)."""
    dead, lock = lock_holder()
    dead.kill()
    dead.wait()
    assert dead.stdout is not None
    dead.stdout.close()
    dead.lock = lock  # type: ignore[attr-defined]
    return dead


@pytest.fixture
def dead() -> Iterator[subprocess.Popen[bytes]]:
    """A :func:`dead_lock_holder`, whose lock file is removed afterwards."""
    holder = dead_lock_holder()
    yield holder
    portable.remove_abandoned_lock(holder.lock)  # type: ignore[attr-defined]


@linux_only
def test_the_supervisor_sweep_waits_the_grace_of_the_holders_own_ttl(store_client, cluster_name, dead):
    # Given a lease held, with a TTL of its own of 20 s (a grace of 5 s), by a process just SIGKILLed
    keys = Keys(cluster_name)
    record = plant_holder(store_client, keys, "daemon:slow", dead, ttl=60, record_ttl=20)
    released: list[str] = []
    # When a node's sweep starts (a supervisor with a short failure timeout of its own)
    sweep = threading.Thread(target=lambda: released.extend(release_dead_holders(store_client, keys)))
    sweep.start()
    time.sleep(1.0)
    # Then the dead holder still holds it a second later: the proof is not the release
    assert json.loads(store_client.get(keys.lease("daemon:slow")))["owner"] == record["owner"]
    assert not released
    # And it is released once the holder's own grace has passed
    sweep.join(timeout=60)
    assert released == ["daemon:slow"] and store_client.get(keys.lease("daemon:slow")) is None


@linux_only
def test_a_record_without_valid_holder_fields_is_never_proven_and_never_raises(store_client, cluster_name, dead):
    # Given a dead holder's real, abandoned lock file, and records naming it with values a store
    # writer could put there: no TTL or one of another type, pids past pid_max (kill would
    # overflow), TTLs of centuries (the grace would overflow or sleep), nested values
    keys = Keys(cluster_name)
    record = plant_holder(store_client, keys, "daemon:base", dead, ttl=60)
    hostile = {"ttl_none": {"ttl": None}, "ttl_text": {"ttl": "1000"}, "ttl_zero": {"ttl": 0},
               "ttl_true": {"ttl": True}, "ttl_float": {"ttl": 1000.5}, "ttl_negative": {"ttl": -5},
               "ttl_huge": {"ttl": 10**400}, "ttl_sleep": {"ttl": 4 * 10**13},
               "pid_2_31": {"pid": 2**31}, "pid_huge": {"pid": 10**30},
               "deep": {"lock": [[[[[]]]]] * 3}, "pidns_list": {"pidns": ["x"]}}
    for name, fields in hostile.items():
        store_client.set(keys.lease(f"daemon:{name}"), json.dumps({**record, **fields}), px=60000)
    store_client.delete(keys.lease("daemon:base"))
    # When the node's sweep looks at them: then it returns, releasing none of them
    assert release_dead_holders(store_client, keys) == []
    assert all(store_client.exists(keys.lease(f"daemon:{name}")) for name in hostile)


@linux_only
def test_a_stopping_node_releases_nothing_more(store_client, cluster_name, dead):
    # Given a dead holder whose grace (a quarter of its 20 s TTL) has not passed
    keys = Keys(cluster_name)
    plant_holder(store_client, keys, "daemon:late", dead, ttl=60, record_ttl=20)
    stop = threading.Event()
    stop.set()
    # When the sweep runs for a node that is stopping: then it returns, releasing nothing (without
    # the stop it would wait out the 5 s grace and release the lease: the key's own TTL is 60 s)
    assert release_dead_holders(store_client, keys, stop) == []
    assert store_client.exists(keys.lease("daemon:late"))


CLOSING_HOLDER = """
import os, sys, time
from flask_immutant import portable
from flask_immutant.cluster.lease import LeaseManager
from flask_immutant.keys import Keys
manager = LeaseManager(sys.argv[1], Keys(sys.argv[2]), "closer", 2.0)
keeper = manager.keeper("closed", lambda fence: None, lambda: None)
while not keeper.held:
    time.sleep(0.01)
os.close(portable._own_lock[1])  # as os.closerange or a daemonizing library would: the flock goes
print("closed", flush=True)
time.sleep(60)
"""


@linux_only
def test_a_live_holder_whose_lock_descriptor_was_closed_is_not_proven_dead(embedded_store, store_client,
                                                                           cluster_name):
    # Given a process holding a lease that closed its lock file's descriptor (the flock is gone)
    keys = Keys(cluster_name)
    proc = subprocess.Popen([sys.executable, "-c", CLOSING_HOLDER, embedded_store.url, cluster_name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    lock = ""
    try:
        assert proc.stdout.readline().strip() == b"closed"
        record = json.loads(store_client.get(keys.lease("closed")))
        lock = record["lock"]
        assert portable.lock_abandoned(lock)  # the lock alone would "prove" it dead
        # Then, alive, it is not proven dead, by a contender's rule or a node's sweep
        assert not holder_is_dead(record)
        assert release_dead_holders(store_client, keys) == []
        assert json.loads(store_client.get(keys.lease("closed")))["owner"] == record["owner"]
        # And once SIGKILLed, it is
        proc.kill()
        proc.wait()
        assert holder_is_dead(json.loads(store_client.get(keys.lease("closed"))))
        # Unless its record names another pid namespace (a container's own)
        assert not holder_is_dead({**record, "pidns": "1:4026531836" if record["pidns"] != "1:4026531836" else "1:1"})
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if lock:
            portable.remove_abandoned_lock(lock)


FORKING_HOLDER = """
import os, sys, time
from flask_immutant.cluster.lease import LeaseManager
from flask_immutant.keys import Keys
manager = LeaseManager(sys.argv[1], Keys(sys.argv[2]), "forker", 20.0)  # a grace of 5 s
keeper = manager.keeper("forked", lambda fence: None, lambda: None)
while not keeper.held:
    time.sleep(0.01)
child = os.fork()  # as multiprocessing's fork does: the child may go on with the singleton's work
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


@linux_only
def test_a_holder_whose_forked_child_lives_on_is_not_proven_dead(managers, embedded_store, store_client,
                                                                 cluster_name):
    # Given a lease held by a process that forked a child, and that process SIGKILLed
    proc = subprocess.Popen([sys.executable, "-c", FORKING_HOLDER, embedded_store.url, cluster_name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    lock = json.loads(store_client.get(Keys(cluster_name).lease("forked")))["lock"]
    try:
        proc.kill()
        proc.wait()
        # When a contender of this host polls it while the child lives
        a = Recorder()
        keeper = managers[0].keeper("forked", a.on_acquired, a.on_lost)
        time.sleep(TTL * 2)  # 16 polls, 8 times the grace after a proof
        # Then the holder is not displaced: its child may still be doing its work
        assert not keeper.held and not a.acquired
        # And once the child is gone too, the contender takes over long before the key expires
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: keeper.held, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        proc.stdout.close()
        portable.remove_abandoned_lock(lock)


def test_a_keeper_stepping_aside_does_not_spin_on_a_dead_holders_grace(managers):
    # Given a keeper that proved a holder dead (its grace over) and was then told to step aside
    keeper = LeaseKeeper(managers[0], "aside", lambda fence: None, lambda: None)  # not started: stepped here
    keeper._dead = ("planted|1|x", time.monotonic() - 1)
    keeper._pause_until = time.monotonic() + 60
    # Then it waits a poll between steps while paused, not no time at all
    assert keeper._step() == TTL / POLLS_PER_TTL
