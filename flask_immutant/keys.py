"""Every Redis key and channel name of a cluster, in one place.

All live under ``immutant:{IMMUTANT_CLUSTER}:`` so several clusters (and other data) can share a
Redis. Feature modules add their names here rather than formatting keys themselves.
"""

from __future__ import annotations

from typing import NamedTuple


def wake_list(messaging_namespace: str, queue: str) -> str:
    """The wake list of ``queue`` (``Keys.messaging_wake``), for the broker's consumers, which know
    only the broker's namespace."""
    return f"{messaging_namespace}:{queue}.wake"


class Keys(NamedTuple):
    """Key names of one cluster. A named tuple, as immutable as a frozen dataclass, whose creation
    costs every command 0.4 ms less."""

    cluster: str

    @property
    def prefix(self) -> str:
        return f"immutant:{self.cluster}:"

    @property
    def members(self) -> str:
        """HASH node name -> JSON member record (address, ports, pid, up-since...)."""
        return f"{self.prefix}members"

    def member_claim(self, name: str) -> str:
        """STRING owner token with a TTL of the failure timeout: the node's heartbeat and name claim."""
        return f"{self.prefix}member:{name}"

    @property
    def events(self) -> str:
        """Pub/sub channel of membership events (JSON ``{"event", "name", "reason"}``)."""
        return f"{self.prefix}events"

    @property
    def event_log(self) -> str:
        """STREAM of cluster events (``events/``): ``kind``, ``node``, ``pid``, ``at``, ``fields`` (JSON),
        capped near ``IMMUTANT_EVENTS_MAXLEN`` entries."""
        return f"{self.prefix}event-log"

    @property
    def history(self) -> str:
        """STREAM of cluster samples for the console's charts (``balancer/history.py``): ``sample``
        (JSON: per-queue depth and handled count, per-node load factor), one per slot, capped."""
        return f"{self.prefix}history"

    def history_slot(self, slot: int) -> str:
        """STRING with a TTL: the node that takes history slot ``slot`` (SET NX: one sample per slot)."""
        return f"{self.prefix}history-slot:{slot}"

    def lease(self, name: str) -> str:
        """STRING JSON ``{owner, fence, node, pid, pidns, since, lock, ttl}`` with a TTL: who holds lease
        ``name`` (``lock``, ``pid``, ``pidns``: to prove it dead, ``portable.holder_gone``; ``ttl``: its own, ms)."""
        return f"{self.prefix}lease:{name}"

    def lease_fence(self, name: str) -> str:
        """STRING: the last fencing token handed out for lease ``name`` (never expires)."""
        return f"{self.prefix}lease:{name}:fence"

    def lease_last(self, name: str) -> str:
        """STRING JSON of the last holder of lease ``name`` (no TTL); a release deletes it, so one
        still there at the next acquisition means the holder never released: a failover."""
        return f"{self.prefix}lease:{name}:last"

    @property
    def lease_released(self) -> str:
        """Pub/sub channel: the name of each lease released, to wake its contenders."""
        return f"{self.prefix}lease-released"

    @property
    def daemons(self) -> str:
        """HASH ``name`` or ``name@node`` -> JSON daemon record (state, restarts, last error)."""
        return f"{self.prefix}daemons"

    # --- messaging (flask_immutant.messaging) ---

    @property
    def messaging_namespace(self) -> str:
        """Prefix of Dramatiq's Redis broker keys (its queues, ``.msgs`` hashes, ack sets)."""
        return f"{self.prefix}mq"

    @property
    def messaging_destinations(self) -> str:
        """HASH destination name -> JSON ``{"kind", "queue"}``: every destination ever started."""
        return f"{self.prefix}mq-destinations"

    @property
    def messaging_queues(self) -> str:
        """SET of the Dramatiq queue names consumed in the cluster (the reaper walks them)."""
        return f"{self.prefix}mq-queues"

    @property
    def messaging_consumers(self) -> str:
        """SET of consumer ids (one per app runtime process) that may hold unacked messages."""
        return f"{self.prefix}mq-consumers"

    def messaging_wake(self, queue: str) -> str:
        """LIST of tokens, one per published message, that idle consumers of ``queue`` BLPOP."""
        return wake_list(self.messaging_namespace, queue)

    def messaging_release(self, consumer_id: str) -> str:
        """LIST a stopping runtime pushes to, to end its own idle consumers' waits: they BLPOP it
        beside their queue's wake list, whose tokens any consumer may take or clear."""
        return f"{self.messaging_namespace}:__release__.{consumer_id}"

    @property
    def messaging_beats(self) -> str:
        """HASH ``last``/``since``: when (store time, ms) a consumer last beat, and since when beats
        have come without a gap; the reaper judges no one dead until that run lasts a failure timeout."""
        return f"{self.prefix}mq-beats"

    def messaging_consumer(self, consumer_id: str) -> str:
        """STRING JSON heartbeat of one consumer, TTL = failure timeout; gone means dead."""
        return f"{self.prefix}mq-consumer:{consumer_id}"

    def messaging_subscriptions(self, topic: str) -> str:
        """HASH subscription queue -> JSON ``{"owner", "durable"}`` of one topic."""
        return f"{self.prefix}mq-subscriptions:{topic}"

    @property
    def messaging_handled(self) -> str:
        """HASH queue -> messages handled (or failed) so far, added by each consumer's heartbeat:
        the console's throughput is its difference between two history samples."""
        return f"{self.prefix}mq-handled"

    def messaging_dead(self, queue: str) -> str:
        """HASH message id -> JSON dead-letter record (envelope, reason, retries) of one queue."""
        return f"{self.prefix}mq-dead:{queue}"

    def messaging_dedupe(self, destination: str, key: str) -> str:
        """STRING with a TTL: a message with idempotency ``key`` was published to ``destination``."""
        return f"{self.prefix}mq-key:{destination}:{key}"

    def messaging_done(self, queue: str, key: str) -> str:
        """STRING with a TTL: the message with idempotency ``key`` was handled from ``queue``."""
        return f"{self.prefix}mq-done:{queue}:{key}"

    def messaging_reply(self, correlation_id: str) -> str:
        """LIST holding the JSON response to one ``request`` (expires)."""
        return f"{self.prefix}mq-reply:{correlation_id}"

    def jobs_schedule(self, app: str) -> str:
        """ZSET job id -> next due time (epoch s): rq-scheduler's ``scheduled_jobs_key`` for ``app``."""
        return f"{self.prefix}jobs:{app}:schedule"

    @property
    def rq_job_prefix(self) -> str:
        """Prefix of the RQ job hashes rq-scheduler keeps each schedule in (JSON-serialised)."""
        return f"{self.prefix}rq:job:"

    def job_state(self, app: str, name: str) -> str:
        """HASH fired, last_due, last_fired_at, last_node, last_error of one job."""
        return f"{self.prefix}jobs:{app}:state:{name}"

    @property
    def deployments(self) -> str:
        """HASH deployment name -> signed JSON record (``deploy/records.py``)."""
        return f"{self.prefix}deployments"

    @property
    def deployments_changed(self) -> str:
        """Pub/sub channel: the name of each deployment added, changed or removed."""
        return f"{self.prefix}deployments-changed"

    @property
    def deployments_issued(self) -> str:
        """HASH deployment name -> JSON ``{epoch, version}`` last issued, kept across undeploys so
        a name deployed again gets a newer version than nodes have run."""
        return f"{self.prefix}deployments-issued"

    def deployment_archive(self, sha256: str) -> str:
        """STRING: an app archive (.tar.gz), by its sha256; no TTL, deleted when no deployment names it."""
        return f"{self.prefix}archive:{sha256}"

    def deployment_nodes(self, name: str) -> str:
        """HASH node -> JSON state of deployment ``name`` on that node (deployed, failed...)."""
        return f"{self.prefix}deployment:{name}:nodes"

    def context(self, node: str, context_path: str) -> str:
        """STRING JSON context of one app runtime (host, port, load...), TTL = failure timeout."""
        return f"{self.prefix}context:{node}:{context_path}"

    @property
    def contexts(self) -> str:
        """SET of ``context(...)`` keys, to list contexts without SCAN (stale ones are skipped)."""
        return f"{self.prefix}contexts"

    @property
    def context_control(self) -> str:
        """HASH ``node|context`` (``*`` for any) -> ENABLED/DISABLED/STOPPED set by ``flask immutant ctl``."""
        return f"{self.prefix}context-control"

    @property
    def context_weight(self) -> str:
        """HASH ``node|context`` (``*`` for any) -> manual load factor set by ``ctl weight``."""
        return f"{self.prefix}context-weight"

    @property
    def contexts_changed(self) -> str:
        """Pub/sub channel: a context appeared, left or changed state (balancers resync)."""
        return f"{self.prefix}contexts-changed"

    def loop_health(self, process: str) -> str:
        """STRING JSON health of one process's background loops (``loops.py``), TTL = failure timeout."""
        return f"{self.prefix}loop-health:{process}"

    @property
    def loop_health_index(self) -> str:
        """SET of the processes with a ``loop_health`` key (entries whose key expired are dropped on read)."""
        return f"{self.prefix}loop-health"

    def pattern(self) -> str:
        """Glob matching every key of this cluster (for cleanup and inspection)."""
        return f"{self.prefix}*"

    def session(self, app: str, sid: str) -> str:
        """HASH session key -> serialized value: one HTTP session of app ``app`` (TTL: its lifetime)."""
        return f"{self.prefix}session:{app}:{sid}"

    def cache_prefix(self, name: str) -> str:
        """Prefix of every key of cache ``name`` (also the prefix its near caches track)."""
        return f"{self.prefix}cache:{name}:"

    def cache_entry(self, name: str, key: str) -> str:
        """STRING: one entry of cache ``name`` (1-byte header + serialized value, or an integer)."""
        return f"{self.prefix}cache:{name}:k:{key}"

    def cache_index(self, name: str) -> str:
        """ZSET entry key -> last use (µs): LRU order of cache ``name`` when it has ``max_entries``."""
        return f"{self.prefix}cache:{name}:lru"

    def cache_memo(self, name: str, function: str, digest: str) -> str:
        """STRING: one memoized result in cache ``name`` (header with fresh-until + value)."""
        return f"{self.prefix}cache:{name}:m:{function}:{digest}"

    def cache_lock(self, memo_key: str) -> str:
        """STRING owner token with a TTL: who computes ``memo_key`` now (the stampede guard)."""
        return f"{memo_key}:lock"
