"""Every kind of cluster event, in one place: its name, what it means, who emits it, its fields.

``docs/events.md`` lists the same table (``tests/test_docs.py`` compares them), and the writer
refuses a kind that is not here. Each cluster-wide fact has exactly one emitter: a member that
leaves by timeout is seen by every node, but only the node whose reap script removed it says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Kind:
    """One event kind: ``fields`` are the names its ``fields`` object carries (all optional to readers)."""

    name: str
    meaning: str
    emitter: str
    fields: tuple[str, ...]


Name = Literal[
    "member.joined", "member.left", "lease.acquired", "lease.released", "lease.lost", "daemon.restarted",
    "deploy.requested", "undeploy.requested", "deploy.node", "undeploy.node", "ctl.action", "message.dead",
    "store.outage",
]

KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("member.joined", "a node joined the cluster", "the node that joined, once its name claim succeeded",
         ("member", "address", "http_port", "pid")),
    Kind("member.left", "a node left: `reason` is `left` (it stopped) or `timeout` (its heartbeat expired)",
         "`left`: the node leaving; `timeout`: the one node whose reap removed it, or the node that took its "
         "name over before any reap", ("member", "reason")),
    Kind("lease.acquired", "a singleton lease (daemon or scheduler) has a new holder; `failover` is true when the "
         "previous holder never released it (it crashed, stalled or lost the store)",
         "the new holder", ("lease", "fence", "failover", "previous_node")),
    Kind("lease.released", "a holder gave its lease up on purpose (stopping, undeployed, or stepping aside); "
         "`left_to_expire` is true when it stopped without deleting the key, so the next holder waits out the TTL",
         "the holder", ("lease", "fence", "left_to_expire")),
    Kind("lease.lost", "a holder found its lease expired or taken, could not renew it, or stalled past its "
         "renewal deadline, and stopped its work",
         "the holder that lost it", ("lease", "fence", "reason")),
    Kind("daemon.restarted", "a daemon failed or returned and is restarted in place", "the runtime running it",
         ("daemon", "restarts", "error")),
    Kind("deploy.requested", "a deployment record was stored (`flask immutant deploy`, a descriptor)",
         "the process that stored it", ("deployment", "version", "rollback", "by")),
    Kind("undeploy.requested", "a deployment record was removed", "the process that removed it",
         ("deployment", "by")),
    Kind("deploy.node", "the outcome of a deployment on one node: `state` is `deployed`, `failed` or `refused`",
         "that node's deployer", ("deployment", "state", "version", "error")),
    Kind("undeploy.node", "a node stopped running a deployment that was removed", "that node's deployer",
         ("deployment",)),
    Kind("ctl.action", "a context control or weight was set (`flask immutant ctl`, the console)",
         "the command or console", ("action", "scope_node", "context_path", "weight", "by")),
    Kind("message.dead", "a message was dead-lettered", "the consumer that buried it",
         ("queue", "destination", "message_id", "reason", "attempts")),
    Kind("store.outage", "a node could not reach the store; written once it answers again",
         "each node supervisor, for its own view", ("since", "until", "seconds", "error")),
)}
