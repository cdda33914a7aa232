"""The deployments folder, as JBoss had: ``IMMUTANT_HOME/deployments/<name>.json``.

Dropping a descriptor file there deploys it to the cluster; deleting it undeploys. Markers next
to it say what happened: ``<name>.json.deployed`` (holding the version) or
``<name>.json.failed`` (holding the reason). Every node of the machine scans the folder; a file
lock makes one of them act on each change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from .records import Deployment, DeploymentError
from .store import DeploymentStore

log = logging.getLogger("flask_immutant.deploy")

DESCRIPTOR_FIELDS = {"name", "app", "root", "context_path", "settings"}


def descriptor_to_deployment(path: Path, data: Any) -> Deployment:
    """A deployment from a descriptor ``{"app", "root", "name"?, "context_path"?, "settings"?}``."""
    if not isinstance(data, dict):
        raise DeploymentError(f"{path.name}: a descriptor is a JSON object")
    unknown = set(data) - DESCRIPTOR_FIELDS
    if unknown:
        raise DeploymentError(f"{path.name}: unknown field(s) {', '.join(sorted(unknown))}; "
                              f"allowed: {', '.join(sorted(DESCRIPTOR_FIELDS))}")
    root = data.get("root")
    if not isinstance(root, str) or not os.path.isabs(root):
        raise DeploymentError(f"{path.name}: 'root' must be the app folder's absolute path")
    settings = data.get("settings", {})
    if not isinstance(settings, dict) or not all(isinstance(v, str) for v in settings.values()):
        raise DeploymentError(f"{path.name}: 'settings' must map names to strings")
    for name in ("app", "name"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise DeploymentError(f"{path.name}: {name!r} must be a string, not {type(data[name]).__name__}")
    context = data.get("context_path", "/")
    if not isinstance(context, str) or not context.startswith("/"):
        raise DeploymentError(f"{path.name}: 'context_path' must start with '/'")
    return Deployment(name=data.get("name") or path.stem, import_path=data.get("app"), root=root,
                      context_path=context, settings=settings, deployed_by=f"folder {path.parent}")


class DeploymentFolder:
    def __init__(self, folder: Path, store: DeploymentStore) -> None:
        self.folder = folder
        self.store = store

    def scan(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            for path in sorted(self.folder.glob("*.json")):
                try:
                    self._consider(path)
                except redis.RedisError:
                    raise
                except Exception as exc:  # one odd descriptor fails alone; the folder goes on
                    log.exception("deployment descriptor %s could not be read", path)
                    _marker(path, "failed").write_text(f"{type(exc).__name__}: {exc}\n")
            for marker in self.folder.glob("*.json.deployed"):
                descriptor = marker.with_suffix("")
                if not descriptor.exists():
                    self._undeploy(marker)

    def _consider(self, path: Path) -> None:
        deployed, failed = _marker(path, "deployed"), _marker(path, "failed")
        newest_marker = max((m.stat().st_mtime for m in (deployed, failed) if m.exists()), default=None)
        if newest_marker is not None and newest_marker >= path.stat().st_mtime:
            return
        try:
            deployment = descriptor_to_deployment(path, json.loads(path.read_text()))
            stored = self.store.put(deployment)
        except (ValueError, DeploymentError) as exc:
            failed.write_text(f"{exc}\n")
            with contextlib.suppress(FileNotFoundError):
                deployed.unlink()
            log.error("deployment descriptor %s failed: %s", path, exc)
            return
        deployed.write_text(json.dumps({"name": stored.name, "version": stored.version}) + "\n")
        with contextlib.suppress(FileNotFoundError):
            failed.unlink()
        log.info("deployment descriptor %s deployed %s", path.name, stored.label)

    def _undeploy(self, marker: Path) -> None:
        try:
            name = json.loads(marker.read_text())["name"]
        except (ValueError, KeyError, OSError):
            name = marker.name.removesuffix(".json.deployed")
        self.store.remove(name)
        marker.unlink()
        log.info("deployment descriptor for %s removed: undeployed", name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _marker(descriptor: Path, kind: str) -> Path:
    return descriptor.with_name(f"{descriptor.name}.{kind}")
