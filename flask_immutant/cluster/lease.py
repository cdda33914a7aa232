"""Leases with fencing tokens: what singleton daemons and the job scheduler hold.

A lease is a key holding ``{owner, fence, node, pid, pidns, since, lock, ttl}`` with a TTL of the
failure timeout, renewed every quarter of it and released by compare-and-delete (Lua in
``lease_*.lua`` beside it). Each acquisition returns a strictly increasing fencing token.

The holder's rule: its lease is *valid* only until ``sent + ttl - margin``, where ``sent`` is
when the last successful renewal was sent (the key's expiry is at least ``sent + ttl``). When a
renewal fails or the process stalls past that deadline, the holder gives the lease up and stops
its work before the key can expire, so two holders never act at once. Contenders poll every
eighth of the TTL and are woken at once by a release.

A holder that crashed is replaced before its key expires only when its death is *proven*: the
contender (or a node supervisor that reaped a runtime: :func:`release_dead_holders`) can take the
lock file the holder's process holds for its life (``lock``), which the kernel allows only once
that process and every child it forked are gone, and the holder's pid is free in the prover's own
pid namespace (``pidns``): :func:`holder_is_dead`, ``portable.holder_gone``. A holder that is
alive but stalled or cut off is never displaced: its own stop rule above still runs first. See
docs/guarantees.md.

With ``IMMUTANT_LEASE_REPLICAS`` = N > 0 (a replicated store, see docs/guarantees.md) every
acquisition and renewal is followed by ``WAIT N`` on the same connection, and counts only when N
replicas confirmed it: a primary cut off with its holder cannot extend a lease the promoted replica
does not know about, so the holder runs out of its deadline before the replica's copy expires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import events, lua, portable
from ..keys import Keys
from ..loops import Loop
from ..metrics import definitions as metrics
from ..protocols import Slot
from ..records import MALFORMED, from_json, warn
from ..store.connect import Subscription

if TYPE_CHECKING:
    from ..state import ImmutantState

log = logging.getLogger(__name__)

#: Renewals per TTL.
RENEWALS_PER_TTL = 4
#: Contender polls per TTL (a release also wakes contenders at once).
POLLS_PER_TTL = 8
#: Fraction of the TTL kept as a margin: work stops this long before the key could expire.
SAFETY_MARGIN = 0.25
#: Fraction of the TTL a write waits for replicas to confirm it (``WAIT``), when they must.
CONFIRM_WAIT = 0.125
#: Fraction of the TTL between proving a holder dead and releasing its lease: what it sent just
#: before it died may still be on its way to the store, and a live holder's last write gets as
#: long (the margin) before its key can expire.
DEAD_HOLDER_GRACE = SAFETY_MARGIN


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as stored in it."""

    name: str
    node: str
    pid: int
    fence: int
    since: float

    def status(self) -> dict[str, Any]:
        return {"node": self.node, "pid": self.pid, "fencing_token": self.fence, "since": self.since}


def holder_info(node: str, lock: str | None, ttl_ms: int) -> str:
    """The holder record this process writes into a lease it acquires (the script adds owner and
    fence): ``lock`` (``portable.own_lock``), ``pid`` and ``pidns`` let a process of the same machine
    prove it dead later (``portable.holder_gone``); ``ttl`` (ms, the holder's own) sets how long a
    prover waits after the proof (:func:`dead_holder_grace`)."""
    return json.dumps({"node": node, "pid": os.getpid(), "pidns": portable.pid_namespace(), "since": time.time(),
                       "lock": lock, "ttl": ttl_ms})


#: The longest TTL a holder record may give, ms: the longest failure timeout a setting allows
#: (300 s), with room; a larger value (store data) proves nothing rather than a sleep of centuries.
MAX_TTL_MS = 3_600_000


def dead_holder_grace(record: Any) -> float | None:
    """Seconds between proving the holder of ``record`` dead and releasing its lease: a quarter of
    the holder's own TTL (a deployment may set its own failure timeout), or None without a valid one."""
    ttl = record.get("ttl") if isinstance(record, dict) else None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_MS:
        return None
    return ttl / 1000 * DEAD_HOLDER_GRACE


def holder_is_dead(record: Any) -> bool:
    """Whether the holder named by a lease record read from the store is provably dead, seen from
    this process (``portable.holder_gone``: its lock file abandoned and its pid free here); False
    for anything else, malformed records and old records without ``lock``, ``pidns`` or ``ttl``
    included. The one rule for contenders and supervisors (membership uses ``holder_gone`` too)."""
    return (dead_holder_grace(record) is not None
            and portable.holder_gone(record.get("lock"), record.get("pid"), record.get("pidns")))


def read_holder(store: redis.Redis, keys: Keys, name: str) -> Holder | None:
    """The current holder of lease ``name``, or ``None`` if it is free."""
    try:
        raw = store.get(keys.lease(name))
        if raw is None:
            return None
        data = from_json(raw)
        return Holder(name, str(data["node"]), int(data["pid"]), int(data["fence"]), float(data["since"]))
    except MALFORMED as exc:
        warn(f"lease {name!r} holds something else than a holder record ({type(exc).__name__}: {exc})")
        return None


class LeaseKeeper:
    """Contends for one lease and keeps it; calls ``on_acquired(fence)`` and ``on_lost()``.

    Both callbacks run on the keeper's thread: ``on_acquired`` should start work elsewhere and
    return; ``on_lost`` should stop the work (bounded) and return. While it is held,
    :meth:`valid` says whether the work may still act.
    """

    def __init__(
        self,
        manager: LeaseManager,
        name: str,
        on_acquired: Callable[[int], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.manager = manager
        self.name = name
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self.fence: int | None = None
        self.held_since: float | None = None
        self._owner = ""
        self._deadline = 0.0
        self._pause_until = 0.0
        poll = manager.ttl / POLLS_PER_TTL
        self._loop = Loop(f"lease-{name}", self._step, poll, backoff_cap=manager.ttl / RENEWALS_PER_TTL)
        self._unconfirmed_owner = ""  # owner token of an acquisition no replica confirmed yet
        self._dead: tuple[str, float] | None = None  # a dead holder's owner token, when its grace ends
        metrics.LEASE_HOLDER.set(0, name)

    @property
    def held(self) -> bool:
        return self.fence is not None

    def valid(self) -> bool:
        """True while the lease is held and its local deadline has not passed."""
        return self.fence is not None and time.monotonic() < self._deadline

    def start(self) -> LeaseKeeper:
        self._loop.start()
        return self

    def step_aside(self, seconds: float) -> None:
        """Give the lease up (if held) and do not contend for ``seconds``: let another node try."""
        self._pause_until = time.monotonic() + seconds
        self._loop.wake()

    def stop(self, release: bool = True) -> None:
        """Stop contending; if held, stop the work (``on_lost``) and release so another takes over."""
        self._loop.stop(timeout=self.manager.ttl * 4)
        if self.fence is not None:
            self._lose(release=release)
        elif self._unconfirmed_owner:
            self.manager.release(self.name, self._unconfirmed_owner)

    def wake(self) -> None:
        self._loop.wake()

    # --- the keeper thread ---

    def _step(self) -> float:
        """Contend (every poll) or renew (every renewal interval); returns the wait until the next step."""
        m = self.manager
        if self.fence is None:
            if time.monotonic() < self._pause_until:  # stepping aside: no proof's grace to come back for
                return m.ttl / POLLS_PER_TTL
            self._try_acquire()
            if self.fence is None and self._dead is not None:  # come back when its grace ends
                return min(m.ttl / POLLS_PER_TTL, max(0.0, self._dead[1] - time.monotonic()))
            return m.ttl / (POLLS_PER_TTL if self.fence is None else RENEWALS_PER_TTL)
        if time.monotonic() < self._pause_until:
            log.info("lease %s: stepping aside so another node can try", self.name)
            self._lose(release=True)
            return m.ttl / POLLS_PER_TTL
        self._renew()
        return m.ttl / (POLLS_PER_TTL if self.fence is None else RENEWALS_PER_TTL)

    def _try_acquire(self, retry: bool = True) -> None:
        m = self.manager
        # An unconfirmed acquisition keeps its owner token: the next try renews that key (the
        # script returns the same fence) instead of waiting for it to expire.
        owner = self._unconfirmed_owner or f"{m.node}|{os.getpid()}|{uuid.uuid4().hex}"
        sent = time.monotonic()
        info = holder_info(m.node, portable.own_lock(m), m.ttl_ms)
        reply, confirmed = m.confirmed("acquire", [m.keys.lease(self.name), m.keys.lease_fence(self.name),
                                                   m.keys.lease_last(self.name)], [owner, m.ttl_ms, info])
        fence, previous = reply if reply else (None, None)
        if fence is None:  # held by another: ``previous`` is its record
            self._unconfirmed_owner = ""
            if self._dead_holder_released(previous) and retry:
                self._try_acquire(retry=False)
            return
        self._dead = None
        if not confirmed:
            # Not released: a release wakes every contender, and none could be confirmed either.
            (log.debug if self._unconfirmed_owner else log.warning)(
                "lease %s: acquisition not confirmed by %d replica(s) (IMMUTANT_LEASE_REPLICAS); not acting "
                "on it", self.name, m.replicas)
            self._unconfirmed_owner = owner
            return
        self._unconfirmed_owner = ""
        self._owner, self.fence, self.held_since = owner, int(fence), time.time()
        self._deadline = sent + m.ttl * (1 - SAFETY_MARGIN)
        log.info("lease %s acquired by %s (fencing token %d)", self.name, m.node, self.fence)
        events.emit("lease.acquired", lease=self.name, fence=self.fence, failover=previous is not None,
                    previous_node=_holder_node(previous))
        metrics.LEASE_ACQUIRED.inc(self.name)
        metrics.LEASE_HOLDER.set(1, self.name)
        try:
            self.on_acquired(self.fence)
        except Exception:
            log.exception("lease %s: on_acquired failed", self.name)

    def _dead_holder_released(self, current: Any) -> bool:
        """Release the lease on behalf of ``current`` (the holder record the acquisition found) if
        that holder is provably dead and was already so :data:`DEAD_HOLDER_GRACE` ago; remembers
        when it was first proven dead, so the keeper comes back then. Any doubt: False."""
        try:
            record = from_json(current) if current is not None else None
        except ValueError:
            record = None
        owner = record.get("owner") if isinstance(record, dict) else None
        if not isinstance(owner, str) or not holder_is_dead(record):
            self._dead = None
            return False
        assert isinstance(record, dict)
        grace = dead_holder_grace(record)
        assert grace is not None  # holder_is_dead checked it
        now = time.monotonic()
        if self._dead is None or self._dead[0] != owner:
            self._dead = (owner, now + grace)
            log.info("lease %s: its holder (node %s, pid %s) is dead (its lock file is free); taking over in %.2fs",
                     self.name, record.get("node"), record.get("pid"), grace)
            return False
        if now < self._dead[1]:
            return False
        self._dead = None
        if not self.manager.release(self.name, owner, dead=True):
            return False
        # Its lock file goes once the dead holder's other leases have expired too: until then it
        # proves the death to their contenders.
        timer = threading.Timer(grace / DEAD_HOLDER_GRACE, portable.remove_abandoned_lock, [record.get("lock")])
        timer.daemon = True
        timer.start()
        return True

    def _renew(self) -> None:
        m = self.manager
        if time.monotonic() >= self._deadline:
            log.warning("lease %s: deadline passed before renewal (stalled?); giving it up", self.name)
            self._lose(release=True, lost="its renewal deadline passed (stalled)")
            return
        sent = time.monotonic()
        try:
            renewed, confirmed = m.confirmed("renew", [m.keys.lease(self.name)], [self._owner, m.ttl_ms])
            if renewed and not confirmed:
                raise redis.RedisError(f"renewal not confirmed by {m.replicas} replica(s)")
        except redis.RedisError as exc:
            if time.monotonic() >= self._deadline - m.ttl / RENEWALS_PER_TTL:
                log.warning("lease %s: cannot renew (%s); stopping work before it can expire", self.name, exc)
                self._lose(release=False, lost=f"cannot renew: {exc}")
            raise
        if renewed:
            self._deadline = sent + m.ttl * (1 - SAFETY_MARGIN)
            metrics.LEASE_RENEW_SECONDS.observe(time.monotonic() - sent, self.name)
        else:
            log.warning("lease %s: lost (expired or taken); stopping work", self.name)
            self._lose(release=False, lost="expired or taken")

    def _lose(self, release: bool, lost: str | None = None) -> None:
        """Stop the work; ``release`` the key. ``lost``: why the holder lost it (it could not renew,
        stalled, or found it expired or taken); ``None``: it gave the lease up on purpose — stepping
        aside, stopping, or stopping with ``release=False`` to leave the key to expire."""
        owner, self._deadline, fence = self._owner, 0.0, self.fence
        metrics.LEASE_HOLDER.set(0, self.name)
        (metrics.LEASE_LOST if lost else metrics.LEASE_RELEASED).inc(self.name)
        try:
            self.on_lost()
        except Exception:
            log.exception("lease %s: on_lost failed", self.name)
        finally:
            self.fence, self.held_since = None, None
        if release:
            self.manager.release(self.name, owner)
        if lost is not None:
            events.emit("lease.lost", lease=self.name, fence=fence, reason=lost)
        else:
            events.emit("lease.released", lease=self.name, fence=fence, left_to_expire=not release)


class LeaseManager:
    """The leases of one process: a store client with short timeouts and one listener for
    releases that wakes the matching keepers."""

    def __init__(self, store_url: str, keys: Keys, node: str, ttl: float, replicas: int = 0) -> None:
        from ..store import client_from_url

        self.keys = keys
        self.node = node
        self.ttl = ttl
        self.ttl_ms = int(ttl * 1000)
        self.replicas = replicas
        self.wait_ms = max(1, int(ttl * CONFIRM_WAIT * 1000))
        # A renewal that takes longer than a renewal interval is as good as failed, and is not
        # retried: the next renewal is the retry, so a dead store is noticed within the margin.
        timeout = max(0.1, ttl / RENEWALS_PER_TTL)
        self.store = client_from_url(store_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                     retry=Retry(NoBackoff(), 0))
        self.scripts = {name: lua.script(self.store, f"cluster/lease_{name}")
                        for name in ("acquire", "renew", "release")}
        self._keepers: list[LeaseKeeper] = []
        self._subscription = Subscription(self.store, self.keys.lease_released)
        self._listener = Loop("lease-wakeup", self._listen, 0.0, on_error=self._subscription.drop,
                              interrupt=self._subscription.interrupt).start()

    def keeper(self, name: str, on_acquired: Callable[[int], None], on_lost: Callable[[], None]) -> LeaseKeeper:
        keeper = LeaseKeeper(self, name, on_acquired, on_lost)
        self._keepers.append(keeper)
        return keeper.start()

    def confirmed(self, script: str, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        """Run lease script ``script``; the reply, and whether ``replicas`` replicas confirmed it.

        ``WAIT`` counts the writes of its own connection, so both go down one pipeline.
        """
        if not self.replicas:
            return self.scripts[script](keys=keys, args=args, client=self.store), True
        pipe = self.store.pipeline(transaction=False)
        self.scripts[script](keys=keys, args=args, client=pipe)
        pipe.wait(self.replicas, self.wait_ms)
        reply, acknowledged = pipe.execute()
        return reply, int(acknowledged) >= self.replicas

    def release(self, name: str, owner: str, dead: bool = False) -> bool:
        """Compare-and-delete ``name`` if ``owner`` holds it, and wake contenders; ``dead``: on
        behalf of a holder proven dead (:func:`release_dead_holders`). Whether it was released."""
        return release_lease(self.store, self.keys, name, owner, dead, self.scripts["release"])

    def close(self) -> None:
        for keeper in list(self._keepers):
            keeper.stop()
        self._listener.stop(timeout=2)
        self._subscription.drop()
        self.store.close()
        portable.drop_own_lock(self)  # its leases are released: nothing is left to prove

    def _listen(self) -> float:
        """Wake the keepers of a lease just released (they poll anyway)."""
        message = self._subscription.get_message(timeout=0.2)
        if message and message.get("type") == "message":
            name = message["data"].decode(errors="replace") if isinstance(message["data"], bytes) else message["data"]
            for keeper in self._keepers:
                if keeper.name == name and not keeper.held:
                    keeper.wake()
        return 0.0


def release_lease(store: redis.Redis, keys: Keys, name: str, owner: str, dead: bool = False,
                  script: Any = None) -> bool:
    """Compare-and-delete lease ``name`` if ``owner`` holds it and wake its contenders. ``dead``:
    released on behalf of a holder proven dead, so its last-holder key stays and the next
    acquisition is reported as a failover. Whether it was released (False on a store error)."""
    script = script or lua.script(store, "cluster/lease_release")
    try:
        released = script(keys=[keys.lease(name), keys.lease_released, keys.lease_last(name)],
                          args=[owner, name, "dead" if dead else ""], client=store)
    except redis.RedisError as exc:
        log.warning("lease %s: release failed (%s); it will expire", name, exc)
        return False
    if released and dead:
        log.warning("lease %s: released on behalf of its holder, proven dead by its lock file", name)
    return bool(released)


def release_dead_holders(store: redis.Redis, keys: Keys, stop: threading.Event | None = None) -> list[str]:
    """Release every lease of the cluster whose holder is provably dead (:func:`holder_is_dead`),
    so contenders anywhere, other hosts included, take over at once; the names released. Run by
    a node supervisor (on a thread of its own: it blocks) when it reaped a runtime.

    Two passes, as a contender's: the leases proven dead now, then, each after its own holder's
    grace (:func:`dead_holder_grace`), those still held by the same owner and proven dead again.
    Once ``stop`` is set (the node stops), it releases nothing more."""
    if not portable.linux_extras():
        return []  # nothing can be proven from here
    prefix = keys.lease("")
    names = [key.decode(errors="replace") if isinstance(key, bytes) else str(key)
             for key in store.scan_iter(match=keys.lease("*"), count=200)]
    if not names:
        return []
    start = time.monotonic()
    candidates: list[tuple[float, str, str]] = []  # (when its grace ends, key, owner)
    for key, record in zip(names, _lease_records(store, names), strict=True):
        owner = record.get("owner") if record is not None else None
        if record is None or not isinstance(owner, str):
            continue
        if (grace := dead_holder_grace(record)) is not None and holder_is_dead(record):
            candidates.append((start + grace, key, owner))
    released: list[str] = []
    dead_locks: set[object] = set()
    for ends, key, owner in sorted(candidates):
        if (stop or threading.Event()).wait(max(0.0, ends - time.monotonic())):
            break
        record = _lease_records(store, [key])[0]
        if record is None or record.get("owner") != owner or not holder_is_dead(record):
            continue  # released, expired or taken meanwhile, or no longer proven
        dead_locks.add(record.get("lock"))
        if release_lease(store, keys, key[len(prefix):], owner, dead=True):
            released.append(key[len(prefix):])
    for lock in dead_locks:  # every lease its holder held is released: it has proven all it can
        portable.remove_abandoned_lock(lock)
    return released


def _lease_records(store: redis.Redis, keys: list[str]) -> list[dict[str, Any] | None]:
    """The holder records of lease keys ``keys`` (one read), None for any that is gone, not a
    string, without a TTL (a fencing counter, a last-holder record) or not a record."""
    pipe = store.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
        pipe.pttl(key)
    replies = pipe.execute(raise_on_error=False)
    records: list[dict[str, Any] | None] = []
    for raw, pttl in zip(replies[::2], replies[1::2], strict=True):
        record = None
        if isinstance(raw, (bytes, str)) and isinstance(pttl, int) and pttl > 0:
            with contextlib.suppress(ValueError):
                record = from_json(raw)
        records.append(record if isinstance(record, dict) else None)
    return records


def _holder_node(raw: Any) -> str | None:
    """The node named in a holder record read back from the store (``None`` if unreadable)."""
    try:
        data = from_json(raw) if raw is not None else None
    except ValueError:
        return None
    return data.get("node") if isinstance(data, dict) and isinstance(data.get("node"), str) else None


#: The app runtime's one lease manager (shared by daemons and the job scheduler).
LEASES: Slot[LeaseManager] = Slot("leases")


def lease_manager(state: ImmutantState) -> LeaseManager:
    """The one lease manager of an app runtime (shared by daemons and the job scheduler);
    closed by the cluster plugin when the runtime stops."""
    from ..store import store_url

    def make(state: ImmutantState) -> LeaseManager:
        settings = state.settings
        return LeaseManager(store_url(settings, start=True), state.keys, state.node_name,
                            settings["IMMUTANT_FAILURE_TIMEOUT"], settings["IMMUTANT_LEASE_REPLICAS"])

    return state.feature(LEASES, make)


def singleton_name(state: Any, name: str) -> str:
    """Clustered: one lease per name in the cluster. Standalone: one per node, so each
    non-clustered node runs its own singletons, as Immutant does without --clustered."""
    return name if state.settings["IMMUTANT_CLUSTERED"] else f"{name}@{state.node_name}"
