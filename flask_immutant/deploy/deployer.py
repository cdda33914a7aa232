"""The node side of deployment: keep this node's app runtimes in line with the cluster's records.

One thread per node reconciles on every change notice (pub/sub) and at least every
:data:`POLL_INTERVAL`: a new record starts a runtime, a new version of a record starts the new
runtime, waits until it is ready, then drains and stops the old one (on the root context both
share the node's listening socket, so no request is refused), a removed record stops its runtime.
A runtime that fails to import or start is reported with its error and left alone until the
next version; one that crashes later is restarted with backoff.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from ..extension import DEPLOYMENT_ENV
from ..server.node import READY_TIMEOUT, AppTarget, RuntimeProcess
from ..server.runtime import EXIT_APP_FAILED
from ..store import close_quietly
from . import archive
from .records import Deployment, DeploymentError
from .store import DeploymentStore

if TYPE_CHECKING:
    import socket

    from ..server.node import Node

log = logging.getLogger("flask_immutant.deploy")

#: Seconds between full looks at the deployments, besides change notices.
POLL_INTERVAL = 1.0
#: Restart backoff of a deployment's runtime that crashed after it was ready: first delay, cap.
RESTART_BACKOFF = (0.5, 30.0)


@dataclass
class Running:
    """A deployment as this node runs it."""

    deployment: Deployment
    runtime: RuntimeProcess | None
    listener: socket.socket | None
    state: str = "starting"
    error: str | None = None
    restart_delay: float = RESTART_BACKOFF[0]
    restart_at: float = 0.0
    own_listener: bool = False
    retired: list[RuntimeProcess] = field(default_factory=list)


class Deployer:
    def __init__(self, node: Node, store: DeploymentStore, archive_limit: int) -> None:
        self.node = node
        self.store = store
        self.archive_limit = archive_limit
        self.running: dict[str, Running] = {}
        self.refused: dict[str, str] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="immutant-deployer", daemon=True)

    @property
    def name(self) -> str:
        return self.node.identity.name

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Node shutdown: stop every deployment's runtime, in parallel, within the shutdown timeout."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=READY_TIMEOUT)
        timeout = self.node.settings["IMMUTANT_SHUTDOWN_TIMEOUT"]
        with self._lock:
            running, self.running = list(self.running.values()), {}
        threads = [threading.Thread(target=self._retire, args=(r, timeout, True)) for r in running]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def wake(self) -> None:
        self._wake.set()

    # --- the reconcile loop ---

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.store.store.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.store.keys.deployments_changed)
                self.reconcile()
                deadline = time.monotonic() + POLL_INTERVAL
                while not self._stop.is_set() and not self._wake.is_set() and time.monotonic() < deadline:
                    if pubsub.get_message(timeout=0.1):
                        break
                self._wake.clear()
            except redis.RedisError as exc:
                log.warning("deployments: store error: %s; retrying", exc)
                pubsub = None
                self._stop.wait(POLL_INTERVAL)
        if pubsub is not None:
            close_quietly(pubsub)

    def reconcile(self) -> None:
        wanted = self.store.all()
        for name, item in wanted.items():
            if self._stop.is_set():
                return
            if isinstance(item, DeploymentError):
                if self.refused.get(name) != str(item):
                    log.error("refusing deployment %s: %s", name, item)
                    self.refused[name] = str(item)
                    self.store.set_node_state(name, self.name, "refused", error=str(item))
                continue
            self.refused.pop(name, None)
            current = self.running.get(name)
            if current is None or current.deployment.version != item.version:
                self._deploy(item, current)
            else:
                self._supervise(current)
        for name in [n for n in self.running if n not in wanted]:
            with self._lock:
                gone = self.running.pop(name)
            log.info("undeploying %s", gone.deployment.label)
            self._retire(gone, self.node.settings["IMMUTANT_SHUTDOWN_TIMEOUT"], True)
            self._root_served()
            self.store.clear_node_state(name, self.name)

    # --- one deployment ---

    def _deploy(self, deployment: Deployment, current: Running | None) -> None:
        log.info("deploying %s", deployment.label)
        self.store.set_node_state(deployment.name, self.name, "starting", version=deployment.version)
        try:
            target = self._target(deployment)
            listener, own = self._listener_for(deployment, current)
        except DeploymentError as exc:
            self._failed(deployment, current, str(exc))
            return
        runtime = RuntimeProcess(target, listener, self._environ(deployment))
        runtime.spawn()
        if not runtime.wait_ready(READY_TIMEOUT, self._stop):
            reason = runtime.failure or "the app runtime did not become ready"
            runtime.stop(5.0)
            if own and (current is None or listener is not current.listener):
                listener.close()
            self._failed(deployment, current, reason)
            return
        fresh = Running(deployment, runtime, listener, "deployed", own_listener=own)
        with self._lock:
            self.running[deployment.name] = fresh
        self._root_served()
        if current is not None:  # the new one serves: drain the old one
            self._retire(current, self.node.settings["IMMUTANT_SHUTDOWN_TIMEOUT"],
                         close_listener=current.own_listener and current.listener is not listener)
        port = listener.getsockname()[1]
        log.info("deployed %s on http://%s:%d%s", deployment.label, self.node.identity.address, port,
                 deployment.context_path)
        self._report(fresh)

    def _root_served(self) -> None:
        """Tell the node whether a runtime serves its socket (else it answers 503 itself)."""
        responder = self.node.idle_responder
        if responder is None:
            return
        if any(r.deployment.context_path == "/" and r.state == "deployed" for r in self.running.values()):
            responder.served.set()
        else:
            responder.served.clear()

    def _failed(self, deployment: Deployment, current: Running | None, reason: str) -> None:
        log.error("deployment %s failed on %s: %s", deployment.label, self.name, reason)
        if current is not None and current.runtime is not None and current.state == "deployed":
            # Keep serving the previous version; record the failed one as what was asked.
            current.error = f"v{deployment.version} failed: {reason}"
            self.store.set_node_state(deployment.name, self.name, "failed", version=deployment.version,
                                      error=reason, serving_version=current.deployment.version)
            current.deployment = deployment  # do not retry this version on every poll
            return
        with self._lock:
            self.running[deployment.name] = Running(deployment, None, None, "failed", reason)
        self.store.set_node_state(deployment.name, self.name, "failed", version=deployment.version, error=reason)

    def _supervise(self, running: Running) -> None:
        runtime = running.runtime
        if runtime is None or running.state != "deployed":
            return
        code = runtime.poll()
        if code is None:
            return
        runtime.close_pipes()
        now = time.monotonic()
        if running.restart_at == 0.0:
            running.restart_at = now + running.restart_delay
            reason = "failed to start" if code == EXIT_APP_FAILED else f"exited with status {code}"
            log.warning("app runtime of %s %s; restarting in %.1fs", running.deployment.label, reason,
                        running.restart_delay)
            self.store.set_node_state(running.deployment.name, self.name, "restarting",
                                      version=running.deployment.version, error=reason)
            return
        if now < running.restart_at:
            return
        running.restart_at = 0.0
        running.restart_delay = min(RESTART_BACKOFF[1], running.restart_delay * 2)
        runtime.spawn()
        if runtime.wait_ready(READY_TIMEOUT, self._stop):
            running.restart_delay = RESTART_BACKOFF[0]
            self._report(running)

    def _retire(self, running: Running, timeout: float, close_listener: bool) -> None:
        if running.runtime is not None:
            running.runtime.stop(timeout)
        if close_listener and running.own_listener and running.listener is not None:
            running.listener.close()

    def _report(self, running: Running) -> None:
        assert running.runtime is not None and running.listener is not None
        process = running.runtime.process
        self.store.set_node_state(
            running.deployment.name, self.name, running.state, version=running.deployment.version,
            pid=process.pid if process else None, port=running.listener.getsockname()[1],
            context_path=running.deployment.context_path, error=running.error,
        )

    # --- what a runtime needs ---

    def _target(self, deployment: Deployment) -> AppTarget:
        if deployment.archive:
            data = self.store.archive(deployment.archive)
            if data is None:
                raise DeploymentError(f"archive {deployment.archive[:12]} of {deployment.label} is not in the store")
            target = self.node.identity.data_dir / "apps" / deployment.name / deployment.archive[:16]
            if not target.exists():
                archive.unpack(data, deployment.archive, target, self.archive_limit)
            return AppTarget(deployment.import_path, str(target))
        if not Path(deployment.root).is_dir():
            raise DeploymentError(f"app folder {deployment.root} does not exist on node {self.name} "
                                  "(path deployments need a shared folder; use --archive otherwise)")
        return AppTarget(deployment.import_path, deployment.root)

    def _listener_for(self, deployment: Deployment, current: Running | None) -> tuple[socket.socket, bool]:
        """(socket, owned): the node's socket for the root context, else one per deployment."""
        if deployment.context_path == "/":
            if self.node.target is not None:
                raise DeploymentError(f"the root context of node {self.name} serves the app it was started "
                                      "with; deploy this one with --context-path")
            for other in self.running.values():
                if (other.deployment.name != deployment.name and other.deployment.context_path == "/"
                        and other.state == "deployed"):
                    raise DeploymentError(f"context path / is taken by deployment {other.deployment.name}")
            return self.node.listener, False
        if current is not None and current.listener is not None and current.own_listener \
                and current.deployment.context_path == deployment.context_path:
            return current.listener, True  # keep the port across a redeploy
        return self.node.bind_extra(), True

    def _environ(self, deployment: Deployment) -> dict[str, str]:
        settings = {k: v for k, v in deployment.settings.items() if k.startswith("IMMUTANT_")}
        config = {k: _config_value(v) for k, v in deployment.settings.items() if not k.startswith("IMMUTANT_")}
        payload = {"name": deployment.name, "version": deployment.version,
                   "context_path": deployment.context_path, "settings": settings, "config": config}
        return {**self.node.runtime_environ(), DEPLOYMENT_ENV: json.dumps(payload)}


def _config_value(raw: str) -> object:
    """``--set DEBUG=true`` sets ``True``, ``--set N=3`` sets ``3``; anything else stays a string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw
