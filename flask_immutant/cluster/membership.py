"""Cluster membership: heartbeats into the store, join and leave seen by every node.

A member is a claim key (owner token, TTL = failure timeout) plus a record in the members hash.
The heartbeat thread renews the claim every quarter of the timeout; the watcher thread keeps a
local view, reaps members whose claim expired and reports joins and leaves. Graceful leaves and
joins are published on a channel so other nodes see them at once; crashes are seen by polling.
Liveness uses Redis key expiry only, so node clocks never have to agree.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import redis

from .. import events, lua
from ..errors import NodeStartError
from ..keys import Keys
from ..loops import Loop
from ..records import check_types, from_json, hash_of, read_records, warn
from ..store.connect import Subscription
from ..store.outage import Recovery

if TYPE_CHECKING:
    from .identity import NodeIdentity

log = logging.getLogger(__name__)

#: Heartbeats per failure timeout: four chances before a busy node is taken for dead.
HEARTBEATS_PER_TIMEOUT = 4


@dataclass(frozen=True)
class Member:
    """One node as the cluster sees it."""

    name: str
    address: str
    host: str
    ports: dict[str, int]
    port_offset: int
    data_dir: str
    pid: int
    hostname: str
    clustered: bool
    started_at: float
    last_heartbeat: float | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, raw: str | bytes, last_heartbeat: float | None = None) -> Member:
        data = from_json(raw)
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "last_heartbeat"}
        check_types(known, _FIELD_TYPES)
        if "ports" not in known:
            raise KeyError("ports")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in known["ports"].items()):
            raise TypeError("'ports' must map names to port numbers")
        return cls(**known, last_heartbeat=last_heartbeat)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("last_heartbeat")
        return json.dumps(data, sort_keys=True)

    def status(self) -> dict[str, Any]:
        """This member in the ``members`` section of ``status --json``."""
        return {
            "name": self.name,
            "address": self.address,
            "host": self.host,
            "ports": dict(self.ports),
            "port_offset": self.port_offset,
            "data_dir": self.data_dir,
            "pid": self.pid,
            "hostname": self.hostname,
            "clustered": self.clustered,
            "up_since": _iso(self.started_at),
            "last_heartbeat": _iso(self.last_heartbeat) if self.last_heartbeat else None,
        }


_FIELD_TYPES: dict[str, type] = {
    "name": str, "address": str, "host": str, "ports": dict, "port_offset": int, "data_dir": str, "pid": int,
    "hostname": str, "clustered": bool, "started_at": float,
}


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _claim_token(lock: str | None) -> str:
    """Owner token: host, pid, a nonce, the node process's lock file and its pid namespace, so a
    restarted node can prove its predecessor dead (``portable.holder_gone``)."""
    from .. import portable  # here: status reads members and never loads the Linux-only calls

    return f"{socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex}|{lock or '-'}|{portable.pid_namespace() or '-'}"


def _holder_is_dead_here(token: str) -> bool:
    """Whether the node that claimed a name with ``token`` is provably gone, by the same proof as
    a lease holder's (``portable.holder_gone``: its lock file abandoned and its pid free in our pid
    namespace). A host name proves nothing (containers share host names); an older node's token
    (three fields) proves nothing either: its name is taken over at its claim's TTL."""
    from .. import portable

    fields = token.rsplit("|", 4)  # a host name may hold "|"
    return (len(fields) == 5 and re.fullmatch(r"[0-9]{1,10}", fields[1]) is not None
            and portable.holder_gone(fields[3], int(fields[1]), fields[4]))


def live_members(store: redis.Redis, keys: Keys, failure_timeout: float) -> list[Member]:
    """The members whose claim is live, sorted by name, with their last heartbeat time."""
    return _read_members(store, keys, failure_timeout)[0]


def _read_members(store: redis.Redis, keys: Keys, failure_timeout: float) -> tuple[list[Member], list[str]]:
    """(live members, names whose claim has expired): two round trips whatever the cluster's size."""
    records = read_records(hash_of(store, keys.members, "member"), "member", lambda _name, raw: raw)
    names = sorted(records)
    if not names:
        return [], []
    pipe = store.pipeline(transaction=False)
    for name in names:
        pipe.pttl(keys.member_claim(name))
    ttls = pipe.execute()
    now = time.time()
    members: list[Member] = []
    expired: list[str] = []
    for name, pttl in zip(names, ttls, strict=True):
        raw = records[name]
        if pttl == -2:  # no claim key: the node stopped heartbeating
            expired.append(name)
            continue
        if pttl is None or pttl < 0 or raw is None:
            continue
        last = now - max(0.0, failure_timeout - pttl / 1000.0)
        try:
            members.append(Member.from_json(raw, last_heartbeat=last))
        except (ValueError, TypeError, KeyError) as exc:
            warn(f"skipped the member record {name!r}: {type(exc).__name__}: {exc}")
    return members, expired


Listener = Callable[[Member, str], None]


class Membership:
    """This node's membership: claim its name, heartbeat, watch the others, leave."""

    def __init__(
        self,
        store: redis.Redis,
        keys: Keys,
        identity: NodeIdentity,
        failure_timeout: float,
        *,
        on_joined: Callable[[Member], None] | None = None,
        on_left: Listener | None = None,
        on_lost: Callable[[str], None] | None = None,
        on_store_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.identity = identity
        self.failure_timeout = failure_timeout
        self.interval = failure_timeout / HEARTBEATS_PER_TIMEOUT
        from .. import portable

        self.token = _claim_token(portable.own_lock(self))
        self.me = Member(
            name=identity.name,
            address=identity.address,
            host=identity.host,
            ports=dict(identity.ports),
            port_offset=identity.port_offset,
            data_dir=str(identity.data_dir),
            pid=os.getpid(),
            hostname=socket.gethostname(),
            clustered=identity.clustered,
            started_at=time.time(),
        )
        self._on_joined = on_joined or (lambda member: None)
        self._on_left = on_left or (lambda member, reason: None)
        self._on_lost = on_lost or (lambda reason: None)
        self._on_store_error = on_store_error or (lambda exc: None)
        self._known: dict[str, Member] = {}
        self._reasons: dict[str, str] = {}
        self._recovery = Recovery(failure_timeout)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loops: list[Loop] = []
        self._subscription = Subscription(self.store, self.keys.events)
        self._claimed = True
        self._scripts = {name: lua.script(store, f"cluster/membership_{name}")
                         for name in ("claim", "heartbeat", "leave", "reap")}

    # --- public ---

    @property
    def members(self) -> list[Member]:
        """This node's current view of the live members."""
        return sorted(self._known.values(), key=lambda m: m.name)

    def join(self) -> None:
        """Claim the node name and announce the join; refuse if a live node holds the name."""
        keys = self._member_keys()
        ttl = self._ttl_ms()
        holder = self._scripts["claim"](keys=keys, args=[self.token, ttl, self.me.name, self.me.to_json(), ""])
        if isinstance(holder, list):  # joined over a predecessor that never left
            self._predecessor_left()
        elif holder is not None:
            holder = holder.decode() if isinstance(holder, bytes) else holder
            if not _holder_is_dead_here(holder):
                self._name_taken(holder)
            # Our predecessor under this name was killed on this host: take the name over now,
            # unless another node starting under it took it first (the script returns its token).
            again = self._scripts["claim"](keys=keys, args=[self.token, ttl, self.me.name, self.me.to_json(), holder])
            if again is not None and not isinstance(again, list):
                self._name_taken(again.decode() if isinstance(again, bytes) else str(again))
            self._predecessor_left()
        events.emit("member.joined", member=self.me.name, address=self.me.address,
                    http_port=self.me.ports.get("http"), pid=self.me.pid)
        self._loops = [
            Loop("heartbeat", self._heartbeat, self.interval, wait_first=True, stop_event=self._stop,
                 backoff_cap=self.interval).start(),
            Loop("membership", self._watch, 0.0, on_error=self._subscription.drop, stop_event=self._stop,
                 interrupt=self._subscription.interrupt).start(),
        ]

    def _name_taken(self, holder: str) -> NoReturn:
        """Refuse to start: a node that is not provably dead holds our name (claim token ``holder``)."""
        from .. import portable

        portable.drop_own_lock(self)
        host = holder.rsplit("|", 4)[0]
        raise NodeStartError(
            f"node name {self.me.name!r} is already used by a running node on {host} in "
            f"cluster {self.keys.cluster!r}; choose another with --node-name or --port-offset"
        )

    def _predecessor_left(self) -> None:
        """Our name's previous holder died without leaving, and nobody had reaped it yet: record its
        departure, as a reap would have (restarted within the failure timeout, it would not be)."""
        events.emit("member.left", member=self.me.name, reason="timeout")

    def leave(self) -> None:
        """Leave at once: other nodes see it through the events channel, not after a timeout."""
        self._wake.set()
        for loop in self._loops:
            loop.stop(timeout=self.failure_timeout)
        self._subscription.drop()
        try:
            left = self._scripts["leave"](keys=self._member_keys(), args=[self.token, self.me.name])
        except redis.RedisError as exc:
            log.warning("could not leave the cluster cleanly (%s); others will see a timeout", exc)
        else:
            from .. import portable

            portable.drop_own_lock(self)
            if left == 1:
                events.emit("member.left", member=self.me.name, reason="left")
                events.flush(1.0)

    def refresh(self) -> None:
        """Re-read the members now (normally done by the watcher thread)."""
        self._wake.set()

    # --- threads ---

    def _member_keys(self, name: str | None = None) -> list[str]:
        name = name or self.me.name
        return [self.keys.member_claim(name), self.keys.members, self.keys.events]

    def _ttl_ms(self) -> int:
        return int(self.failure_timeout * 1000)

    def _heartbeat(self) -> None:
        if not self._claimed:
            return  # the name went to another node: this one is stopping
        try:
            result = self._scripts["heartbeat"](
                keys=self._member_keys(), args=[self.token, self._ttl_ms(), self.me.name, self.me.to_json()]
            )
        except redis.RedisError as exc:
            events.store_failed(exc)
            self._call(self._on_store_error, exc)
            raise
        events.store_answered()
        if result == 0:
            self._claimed = False
            self._on_lost(f"node name {self.me.name!r} was claimed by another node while this one stalled")
        elif result == 2:
            # Its claim lapsed while the store or this node was frozen: it never left, so say only that.
            log.warning("heartbeat restored after its claim lapsed (the store or this node was frozen)")

    def _watch(self) -> float:
        """Poll the members, then wait for an event, a wake or the heartbeat interval."""
        self._subscription.open()  # subscribed before the read, so no event is missed
        self._poll()
        deadline = time.monotonic() + self.interval
        while not self._stop.is_set() and not self._wake.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            message = self._subscription.get_message(timeout=min(remaining, 0.25))
            if message and message.get("type") == "message":
                self._note_event(message["data"])
                break
        self._wake.clear()
        return 0.0

    def _note_event(self, raw: bytes | str) -> None:
        try:
            event = from_json(raw)
        except ValueError:
            return
        if isinstance(event, dict) and event.get("event") == "left" and isinstance(event.get("name"), str):
            self._reasons[event["name"]] = str(event.get("reason", "left"))

    def _drain(self, wait: float = 0.0) -> None:
        """Read the events already sent to us, so a graceful leave is never taken for a timeout."""
        while (message := self._subscription.get_message(timeout=wait)) is not None:
            if message.get("type") == "message":
                self._note_event(message["data"])

    def _poll(self) -> None:
        members, expired = _read_members(self.store, self.keys, self.failure_timeout)
        self._recovery.answered()
        current = {m.name: m for m in members}
        if self._recovery.trusted():
            for name in expired:
                # Every node sees the death; only the one whose reap removed the member reports it.
                if name != self.me.name and self._scripts["reap"](keys=self._member_keys(name), args=[name]) == 1:
                    events.emit("member.left", member=name, reason="timeout")
        else:  # right after an outage every claim may have expired: wait for fresh heartbeats
            current.update({n: self._known[n] for n in expired if n in self._known})
        current.setdefault(self.me.name, self._known.get(self.me.name, self.me))  # we only leave by leave()
        for name, member in current.items():
            if name not in self._known:
                self._known[name] = member
                self._call(self._on_joined, member)
            else:
                self._known[name] = member
        gone = [n for n in self._known if n not in current]
        if any(name not in self._reasons for name in gone):
            # A leave is published before our read saw the member gone: it is on its way to us.
            self._drain(wait=0.05)
        for name in gone:
            member = self._known.pop(name)
            self._call(self._on_left, member, self._reasons.pop(name, "timeout"))

    @staticmethod
    def _call(callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # a plugin's bug must not stop membership
            log.exception("membership listener failed")
