"""Deployments in the cluster store: the signed records, archives and per-node states.

An archive is kept as long as a record names it (no expiry, so a node that joins months later
can still deploy) and deleted when the last record naming it is replaced or undeployed.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from .. import events
from ..keys import Keys
from ..records import check_types, from_json, hash_of, json_object, read_records, required
from .records import Deployment, DeploymentError, sign, verify


class DeploymentStore:
    def __init__(self, store: redis.Redis, keys: Keys, secret: bytes) -> None:
        self.store = store
        self.keys = keys
        self.secret = secret
        self.cluster = keys.cluster  # what every signature binds a record to

    def put(self, deployment: Deployment, archive: bytes | None = None, rollback: bool = False) -> Deployment:
        """Store ``deployment`` as the next version of its name and tell every node.

        ``rollback``: a deliberate rollback, which nodes accept even when they have run a newer
        version of the name (a new epoch, see :mod:`.records`).
        """
        previous = self.get(deployment.name)
        epoch, version = self._next(deployment.name, previous, rollback)
        record = Deployment(**{**deployment.to_dict(), "version": version, "epoch": epoch,
                               "deployed_at": time.time(), "cluster": self.cluster})
        pipe = self.store.pipeline()
        if archive is not None and record.archive:
            pipe.set(self.keys.deployment_archive(record.archive), archive)
        pipe.hset(self.keys.deployments, record.name, sign(record, self.secret))
        pipe.hset(self.keys.deployments_issued, record.name, json.dumps({"epoch": epoch, "version": version}))
        pipe.publish(self.keys.deployments_changed, record.name)
        events.record(pipe, self.keys, "deploy.requested", deployment=record.name, version=version,
                      rollback=rollback, by=events.who())
        pipe.execute()
        if previous is not None and previous.archive and previous.archive != record.archive:
            self._drop_archive_unless_named(previous.archive)
        return record

    def _next(self, name: str, previous: Deployment | None, rollback: bool) -> tuple[int, int]:
        """(epoch, version) newer than the stored record and than any issued before for ``name``."""
        epoch, version = (previous.epoch, previous.version) if previous else (0, 0)
        try:
            issued = from_json(self.store.hget(self.keys.deployments_issued, name) or "{}")
        except ValueError:
            issued = None
        counted = (issued.get("epoch", 0), issued.get("version", 0)) if isinstance(issued, dict) else None
        # An unreadable counter: the stored record decides; nodes refuse anything older.
        if counted is not None and all(type(n) is int and n >= 0 for n in counted):
            epoch, version = max((epoch, version), counted)
        if rollback:
            return max(epoch + 1, int(time.time())), 1
        return epoch, version + 1

    def remove(self, name: str) -> bool:
        previous = self.get(name)
        pipe = self.store.pipeline()
        pipe.hdel(self.keys.deployments, name)
        pipe.publish(self.keys.deployments_changed, name)
        if previous is not None:
            events.record(pipe, self.keys, "undeploy.requested", deployment=name, by=events.who())
        removed, *_ = pipe.execute()
        if previous is not None and previous.archive:
            self._drop_archive_unless_named(previous.archive)
        return bool(removed)

    def _drop_archive_unless_named(self, sha256: str) -> None:
        if not any(isinstance(d, Deployment) and d.archive == sha256 for d in self.all().values()):
            self.store.delete(self.keys.deployment_archive(sha256))

    def get(self, name: str) -> Deployment | None:
        raw = self.store.hget(self.keys.deployments, name)
        if raw is None:
            return None
        try:
            return verify(raw, self.secret, name=name, cluster=self.cluster)
        except DeploymentError:
            return None

    def all(self) -> dict[str, Deployment | DeploymentError]:
        """Every stored deployment, or why it may not run (bad signature, malformed, copied); a record
        whose name is not text is skipped with a warning (``records.py``)."""
        return read_records(hash_of(self.store, self.keys.deployments, "deployment"), "deployment", self._verified)

    def _verified(self, name: str, raw: bytes) -> Deployment | DeploymentError:
        try:
            return verify(raw, self.secret, name=name, cluster=self.cluster)
        except DeploymentError as exc:
            return exc

    def archive(self, sha256: str) -> bytes | None:
        return cast("bytes | None", self.store.get(self.keys.deployment_archive(sha256)))  # redis-py's untyped reply

    def set_node_state(self, name: str, node: str, state: str, record: Deployment | None = None,
                       **details: Any) -> None:
        """``record``: the one this state is about; its version and ``deployed_at`` tell a waiting
        ``deploy`` that the state answers its record, not an earlier one of the same version."""
        if record is not None:
            details.update(version=record.version, deployed_at=record.deployed_at)
        # An unknown detail is left out, not written as null: readers check NODE_STATE_TYPES.
        stored = {"state": state, "since": time.time(), **{k: v for k, v in details.items() if v is not None}}
        pipe = self.store.pipeline()
        pipe.hset(self.keys.deployment_nodes(name), node, json.dumps(stored))
        if state in OUTCOMES:
            events.record(pipe, self.keys, "deploy.node", node=node, deployment=name, state=state,
                          version=details.get("version"), error=details.get("error"))
        pipe.execute()

    def clear_node_state(self, name: str, node: str) -> None:
        pipe = self.store.pipeline()
        pipe.hdel(self.keys.deployment_nodes(name), node)
        events.record(pipe, self.keys, "undeploy.node", node=node, deployment=name)
        pipe.execute()

    def node_states(self, name: str) -> dict[str, dict[str, Any]]:
        return read_records(hash_of(self.store, self.keys.deployment_nodes(name), "node state"), f"{name} node state",
                            _node_state)


#: Node states that are a deployment's outcome on a node (a ``deploy.node`` event each).
OUTCOMES = frozenset({"deployed", "failed", "refused"})

#: The JSON types of a deployment's state on one node (``set_node_state``).
NODE_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "state": str, "since": float, "version": int, "pid": (int, type(None)), "port": (int, type(None)),
    "context_path": str, "error": (str, type(None)), "serving_version": int, "deployed_at": (float, int),
}


def _node_state(name: str, raw: Any) -> dict[str, Any]:
    record = json_object(name, raw)
    required(record, {"state": str})
    check_types(record, NODE_STATE_TYPES)
    return record
