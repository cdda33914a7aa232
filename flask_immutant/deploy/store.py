"""Deployments in the cluster store: the signed records, archives and per-node states."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from ..keys import Keys
from ..records import check_types, hash_of, json_object, read_records, required
from .records import Deployment, DeploymentError, new_version, sign, verify

#: Seconds a stored archive outlives the last deployment that names it (nodes fetch it at once).
ARCHIVE_TTL = 7 * 24 * 3600


class DeploymentStore:
    def __init__(self, store: redis.Redis, keys: Keys, secret: bytes) -> None:
        self.store = store
        self.keys = keys
        self.secret = secret

    def put(self, deployment: Deployment, archive: bytes | None = None) -> Deployment:
        """Store ``deployment`` as the next version of its name and tell every node."""
        previous = self.get(deployment.name)
        version, at = new_version(previous)
        record = Deployment(**{**deployment.to_dict(), "version": version, "deployed_at": at})
        pipe = self.store.pipeline()
        if archive is not None and record.archive:
            pipe.set(self.keys.deployment_archive(record.archive), archive, ex=ARCHIVE_TTL)
        pipe.hset(self.keys.deployments, record.name, sign(record, self.secret))
        pipe.publish(self.keys.deployments_changed, record.name)
        pipe.execute()
        return record

    def remove(self, name: str) -> bool:
        pipe = self.store.pipeline()
        pipe.hdel(self.keys.deployments, name)
        pipe.publish(self.keys.deployments_changed, name)
        removed, _ = pipe.execute()
        return bool(removed)

    def get(self, name: str) -> Deployment | None:
        raw = self.store.hget(self.keys.deployments, name)
        if raw is None:
            return None
        try:
            return verify(raw, self.secret)
        except DeploymentError:
            return None

    def all(self) -> dict[str, Deployment | DeploymentError]:
        """Every stored deployment, or why it may not run (bad signature, malformed); a record
        whose name is not text is skipped with a warning (``records.py``)."""
        return read_records(hash_of(self.store, self.keys.deployments, "deployment"), "deployment", self._verified)

    def _verified(self, _name: str, raw: bytes) -> Deployment | DeploymentError:
        try:
            return verify(raw, self.secret)
        except DeploymentError as exc:
            return exc

    def archive(self, sha256: str) -> bytes | None:
        return self.store.get(self.keys.deployment_archive(sha256))  # type: ignore[return-value]

    def set_node_state(self, name: str, node: str, state: str, **details: Any) -> None:
        record = {"state": state, "since": time.time(), **details}
        self.store.hset(self.keys.deployment_nodes(name), node, json.dumps(record))

    def clear_node_state(self, name: str, node: str) -> None:
        self.store.hdel(self.keys.deployment_nodes(name), node)

    def node_states(self, name: str) -> dict[str, dict[str, Any]]:
        return read_records(hash_of(self.store, self.keys.deployment_nodes(name), "node state"), f"{name} node state",
                            _node_state)


#: The JSON types of a deployment's state on one node (``set_node_state``).
NODE_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "state": str, "since": float, "version": int, "pid": (int, type(None)), "port": (int, type(None)),
    "context_path": str, "error": (str, type(None)), "serving_version": int,
}


def _node_state(name: str, raw: Any) -> dict[str, Any]:
    record = json_object(name, raw)
    required(record, {"state": str})
    check_types(record, NODE_STATE_TYPES)
    return record
