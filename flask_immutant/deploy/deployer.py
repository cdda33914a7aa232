"""The node side of deployment: keep this node's app runtimes in line with the cluster's records.

One thread per node reconciles on every change notice (pub/sub) and at least every
:data:`POLL_INTERVAL`: a new record starts a runtime, a new version of a record starts the new
runtime, waits until it is ready, then has the old one drain and stop in the background
(:mod:`..server.draining`; on the root context both share the node's listening socket, so no
request is refused), a removed record stops its runtime the same way. A drain never holds up
the next deployment or a restart.
A runtime that fails to import or start is reported with its error and left alone until the
next version; one that crashes later is restarted with backoff.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from .. import names
from ..loops import Loop
from ..server.draining import DrainingRuntimes
from ..server.environ import DeploymentEnviron
from ..server.supervisor import READY_TIMEOUT, AppTarget, RuntimeProcess, Unit
from ..store.connect import Subscription
from . import archive
from .marks import HighWaterMarks
from .records import Deployment, DeploymentError
from .store import DeploymentStore

if TYPE_CHECKING:
    import socket

    from ..server.node import Node

log = logging.getLogger("flask_immutant.deploy")

#: Seconds between full looks at the deployments, besides change notices.
POLL_INTERVAL = 1.0
#: Longest wait for a change notice before a wake or stop is noticed (a notice ends it at once).
WAKE_SLICE = 0.05
#: Seconds a runtime that did not become ready gets to exit before it is killed.
FAILED_START_STOP = 5.0


@dataclass
class Running:
    """A deployment as this node runs it."""

    deployment: Deployment
    unit: Unit | None
    listener: socket.socket | None
    state: str = "starting"
    error: str | None = None
    own_listener: bool = False

    @property
    def runtime(self) -> RuntimeProcess | None:
        return None if self.unit is None else self.unit.runtime


class Deployer:
    def __init__(self, node: Node, store: DeploymentStore, archive_limit: int) -> None:
        self.node = node
        self.store = store
        self.archive_limit = archive_limit
        self.running: dict[str, Running] = {}
        self.refused: dict[str, str] = {}
        # Per cluster: one node name (so one data dir) may serve several clusters over time.
        self.marks = HighWaterMarks(
            node.identity.data_dir / f"deployment-marks.{node.settings['IMMUTANT_CLUSTER']}.json")
        self._wake = threading.Event()
        self._lock = threading.Lock()
        #: Displaced, undeployed and failed runtimes, stopping off this deployer's loop.
        self._draining = DrainingRuntimes()
        #: Undeploys whose runtime still drains, per name (a name may be deployed and undeployed
        #: again meanwhile), and names whose last such runtime is gone: their node state is
        #: cleared on the next step.
        self._undeploying: Counter[str] = Counter()
        self._undeployed: set[str] = set()
        self._subscription = Subscription(store.store, store.keys.deployments_changed)
        self._loop = Loop("deployer", self._step, 0.0, on_error=self._subscription.drop,
                          interrupt=self._subscription.interrupt)
        self._stop = self._loop.stopping

    @property
    def name(self) -> str:
        return self.node.identity.name

    def start(self) -> None:
        self._draining.start()
        self._loop.start()

    def stop(self) -> None:
        """Node shutdown: stop every deployment's runtime, in parallel, within the shutdown
        timeout, and wait for those still draining from before (each until its own deadline)."""
        self._wake.set()
        self._loop.stop(timeout=READY_TIMEOUT)
        self._subscription.drop()
        with self._lock:
            running, self.running = list(self.running.values()), {}
        for item in running:
            self._retire(item, close_listener=True)
        self._draining.stop()
        self._clear_undeployed()  # those undeployed just before the stop

    def wake(self) -> None:
        self._wake.set()

    # --- the reconcile loop ---

    def _step(self) -> float:
        """Reconcile, then wait for a change notice, a wake or the poll interval."""
        self._subscription.open()  # subscribe before reading, so no change notice is missed
        self.reconcile()
        deadline = time.monotonic() + POLL_INTERVAL
        while not self._stop.is_set() and not self._wake.is_set() and time.monotonic() < deadline:
            if self._subscription.get_message(timeout=WAKE_SLICE):
                break
        self._wake.clear()
        return 0.0

    def reconcile(self) -> None:
        self._clear_undeployed()
        wanted = self.store.all()
        for name, item in wanted.items():
            if self._stop.is_set():
                return
            current = self.running.get(name)
            record = None
            if not isinstance(item, DeploymentError):
                record, item = item, self._not_older(item, current)
            if isinstance(item, DeploymentError):
                refusal = f"{item} ({record.deployed_at if record else 'unread'})"  # once per record and reason
                if self.refused.get(name) != refusal:
                    log.error("refusing deployment %s: %s", name, item)
                    self.refused[name] = refusal
                    serving = current.deployment.version if current is not None and current.runtime else None
                    self.store.set_node_state(name, self.name, "refused", record, error=str(item),
                                              serving_version=serving)
                if current is not None:
                    self._supervise(current)  # what it ran before keeps running, restarted if it crashes
                continue
            was_refused = self.refused.pop(name, None) is not None
            try:
                if current is None or current.deployment.order != item.order:
                    self._deploy(item, current)
                    continue
                self._supervise(current)
                if was_refused and current.runtime is not None and current.state == "deployed":
                    self._report(current)  # the record it runs is back: say so instead of "refused"
            except (redis.ConnectionError, redis.TimeoutError):
                raise  # an outage: the loop backs off and retries everything
            except Exception as exc:  # one bad deployment (even a key of the wrong type) fails alone
                log.exception("deployment %s broke the deployer's step", item.label)
                self._failed(item, self.running.get(name), f"{type(exc).__name__}: {exc}")
        for name in [n for n in self.refused if n not in wanted]:
            del self.refused[name]  # a refused record that was removed: nothing runs, nothing to report
            if name not in self.running:
                self.store.clear_node_state(name, self.name)
        for name in [n for n in self.running if n not in wanted]:
            with self._lock:
                gone = self.running.pop(name)
            log.info("undeploying %s", gone.deployment.label)
            self.marks.mark_undeployed(name)
            with self._lock:
                self._undeploying[name] += 1
            self._retire(gone, close_listener=True, then=functools.partial(self._stopped_undeployed, name))
            self._root_served()

    def _stopped_undeployed(self, name: str) -> None:
        """An undeployed runtime is gone (in the drains' thread): have the next step say so."""
        with self._lock:
            self._undeploying[name] -= 1
            if self._undeploying[name] <= 0:
                del self._undeploying[name]
                self._undeployed.add(name)
        self.wake()

    def _clear_undeployed(self) -> None:
        """Clear the node state of undeployed names whose runtimes are all gone (``undeploy``
        waits for that), unless the name was deployed again since, or a record written back
        since was refused (that refusal is the state to show)."""
        with self._lock:
            gone = list(self._undeployed)
        for name in gone:
            if name not in self.running and name not in self.refused:
                self.store.clear_node_state(name, self.name)
            with self._lock:
                self._undeployed.discard(name)

    def _not_older(self, deployment: Deployment, current: Running | None) -> Deployment | DeploymentError:
        """The record, if it is not older than what this node has seen of its name (and raise the
        mark to it); else why it is refused."""
        mark = self.marks.get(deployment.name)
        advice = ("an old record was written back, or the store was reset; to roll back on purpose, deploy with "
                  "--rollback")
        if mark is not None and deployment.order < mark:
            return DeploymentError(f"{deployment.label} (epoch {deployment.epoch}) is older than v{mark[1]} "
                                   f"(epoch {mark[0]}) which node {self.name} has seen: {advice}")
        if mark is not None and deployment.order == mark and current is None and self.marks.undeployed(deployment.name):
            return DeploymentError(f"{deployment.label} (epoch {deployment.epoch}) was undeployed on node {self.name}; "
                                   "a record written back after its undeploy is refused: deploy the app again")
        if current is not None and current.deployment.order == deployment.order and current.deployment != deployment:
            return DeploymentError(f"{deployment.label} (epoch {deployment.epoch}) differs from the {deployment.label} "
                                   f"node {self.name} runs: {advice}")
        self.marks.raise_to(deployment.name, deployment.order)
        return deployment

    def _track(self, fresh: Running, draining: Running | None) -> None:
        """Make ``fresh`` the entry of its name; a runtime it displaces, other than the one being
        drained by the caller, is stopped here, so no runtime this node started goes untracked."""
        with self._lock:
            displaced = self.running.get(fresh.deployment.name)
            self.running[fresh.deployment.name] = fresh
        if displaced is not None and displaced is not draining and displaced is not fresh:
            log.warning("stopping an untracked runtime of %s", displaced.deployment.label)
            self._retire(displaced, close_listener=displaced.listener is not fresh.listener)

    # --- one deployment ---

    def _deploy(self, deployment: Deployment, current: Running | None) -> None:
        log.info("deploying %s", deployment.label)
        self.store.set_node_state(deployment.name, self.name, "starting", deployment)
        try:
            target = self._target(deployment)
            listener, own = self._listener_for(deployment, current)
        except DeploymentError as exc:
            self._failed(deployment, current, str(exc))
            return
        unit = self.node.supervisor.start(deployment.label, target, listener, self._environ(deployment))
        if not unit.runtime.ready:
            reason = unit.runtime.failure or "the app runtime did not become ready"
            self._draining.begin(unit.runtime, FAILED_START_STOP)
            if own and (current is None or listener is not current.listener):
                listener.close()
            self._failed(deployment, current, reason)
            return
        fresh = Running(deployment, unit, listener, "deployed", own_listener=own)
        self._track(fresh, current)
        self._root_served()
        if current is not None:  # the new one serves: the old one drains, off this loop
            self._retire(current, close_listener=current.own_listener and current.listener is not listener)
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
            self.store.set_node_state(deployment.name, self.name, "failed", deployment, error=reason,
                                      serving_version=current.deployment.version)
            current.deployment = deployment  # do not retry this version on every poll
            return
        self._track(Running(deployment, None, None, "failed", reason), None)
        self.store.set_node_state(deployment.name, self.name, "failed", deployment, error=reason)

    def _supervise(self, running: Running) -> None:
        """Restart a crashed runtime (the node's supervisor decides when) and say so."""
        if running.unit is None or running.state != "deployed":
            return
        happened = self.node.supervisor.check(running.unit)
        if happened == "crashed":
            self.store.set_node_state(running.deployment.name, self.name, "restarting", running.deployment,
                                      error=running.unit.crash)
        elif happened == "restarted":
            self._report(running)

    def _retire(self, running: Running, close_listener: bool, then: Callable[[], None] | None = None) -> None:
        """Have ``running``'s runtime drain and stop within the shutdown timeout, in the
        background; once it is gone, close its listener (if asked and its own) and run ``then``."""
        listener = running.listener if close_listener and running.own_listener else None

        def gone() -> None:
            if listener is not None:
                listener.close()
            if then is not None:
                then()

        if running.runtime is None:
            gone()
        else:
            self._draining.begin(running.runtime, self.node.settings["IMMUTANT_SHUTDOWN_TIMEOUT"], then=gone)

    def _report(self, running: Running) -> None:
        assert running.runtime is not None and running.listener is not None
        process = running.runtime.process
        self.store.set_node_state(
            running.deployment.name, self.name, running.state, running.deployment,
            pid=process.pid if process else None, port=running.listener.getsockname()[1],
            context_path=running.deployment.context_path, error=running.error,
        )

    # --- what a runtime needs ---

    def _target(self, deployment: Deployment) -> AppTarget:
        if deployment.archive:
            data = self.store.archive(deployment.archive)
            if data is None:
                raise DeploymentError(f"archive {deployment.archive[:12]} of {deployment.label} is not in the store")
            try:
                target = names.child(self.node.identity.data_dir / "apps", deployment.name, deployment.archive[:16])
            except ValueError as exc:
                raise DeploymentError(f"{deployment.label}: {exc}") from None
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
        passed = DeploymentEnviron.of(deployment.name, deployment.version, deployment.context_path,
                                      deployment.settings)
        return {**self.node.runtime_environ(), **passed.environ()}
