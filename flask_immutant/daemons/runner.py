"""Running one daemon in an app runtime: its thread, restarts, lease and status record."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from .. import lua
from ..cluster.lease import SAFETY_MARGIN, LeaseKeeper

if TYPE_CHECKING:
    from flask import Flask

    from ..cluster.lease import LeaseManager
    from ..keys import Keys

log = logging.getLogger("flask_immutant.daemons")

#: Restart backoff after ``start_fn`` raised or returned: first delay and cap, seconds.
RESTART_BACKOFF = (0.5, 10.0)
#: Consecutive failures on one node after which a singleton steps aside for another node.
FAILURES_BEFORE_STEPPING_ASIDE = 3
#: How long a node that stepped aside stays out of the contest, in failure timeouts.
STEP_ASIDE_TIMEOUTS = 5


@dataclass(frozen=True)
class DaemonSpec:
    name: str
    start_fn: Callable[[], Any]
    stop_fn: Callable[[], Any] | None
    singleton: bool


class DaemonContext:
    """What a running daemon can ask about itself (``flask_immutant.daemons.current()``)."""

    def __init__(self, name: str, node: str, fence: int | None, keeper: LeaseKeeper | None) -> None:
        self.name = name
        self.node = node
        #: Fencing token of this run (``None`` for a per-node daemon). Pass it with side effects
        #: so the receiver can reject a stale holder's late writes.
        self.fence = fence
        #: Set when the daemon must stop (lease lost, undeploy, shutdown).
        self.stopping = threading.Event()
        self._keeper = keeper

    def valid(self) -> bool:
        """True while this run may act: not stopping and, for a singleton, its lease is valid."""
        if self.stopping.is_set():
            return False
        return self._keeper is None or self._keeper.valid()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the daemon should stop (use as a loop condition)."""
        return self.stopping.wait(seconds) or not self.valid()


_local = threading.local()


def current() -> DaemonContext | None:
    return getattr(_local, "context", None)


class DaemonRunner:
    """One daemon on one app runtime: contends (singleton) or just runs (per node)."""

    def __init__(self, spec: DaemonSpec, app: Flask, node: str, keys: Keys, store: redis.Redis,
                 leases: LeaseManager | None, lease_name: str) -> None:
        self.spec = spec
        self.app = app
        self.node = node
        self.keys = keys
        self.store = store
        self.leases = leases
        self.lease_name = lease_name
        self.restarts = 0
        self.context: DaemonContext | None = None
        self._keeper: LeaseKeeper | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._record_script = lua.script(store, "daemon_record")

    @property
    def record_field(self) -> str:
        return self.spec.name if self.spec.singleton else f"{self.spec.name}@{self.node}"

    def activate(self) -> None:
        if self.spec.singleton:
            assert self.leases is not None
            self._keeper = self.leases.keeper(self.lease_name, self._begin, self._end)
        else:
            self._begin(None)

    def shutdown(self) -> None:
        """Stop for good (undeploy or shutdown): stop the work and release the lease at once."""
        if self._keeper is not None:
            self._keeper.stop(release=True)
        else:
            self._end()
        self._write_record("stopped")

    # --- lease callbacks (keeper thread) ---

    def _begin(self, fence: int | None) -> None:
        with self._lock:
            self.restarts = 0  # counted per holding: the record shows the current holder's
            context = DaemonContext(self.spec.name, self.node, fence, self._keeper)
            self.context = context
            self._thread = threading.Thread(target=self._loop, args=(context,), daemon=True,
                                            name=f"immutant-daemon-{self.spec.name}")
            self._thread.start()

    def _end(self) -> None:
        with self._lock:
            context, thread = self.context, self._thread
            if context is None:
                return
            context.stopping.set()
            self._call_stop()
            # Stop before the lease could expire: the margin is what we have.
            budget = (self.leases.ttl * SAFETY_MARGIN * 0.8) if self.leases else 5.0
            if thread is not None and thread is not threading.current_thread():
                thread.join(budget)
                if thread.is_alive():
                    log.warning("daemon %s did not stop within %.2fs; its fencing token %s guards its writes",
                                self.spec.name, budget, context.fence)
            self.context, self._thread = None, None

    # --- the daemon thread ---

    def _loop(self, context: DaemonContext) -> None:
        _local.context = context
        failures = 0
        delay = RESTART_BACKOFF[0]
        self._write_record("running", context)
        while not context.stopping.is_set():
            log.info("daemon %s starting on %s%s", self.spec.name, self.node,
                     f" (fencing token {context.fence})" if context.fence is not None else "")
            error = None
            started = time.monotonic()
            try:
                with self.app.app_context():
                    self.spec.start_fn()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.exception("daemon %s failed", self.spec.name)
            if not context.valid():
                break  # the lease was lost (or the daemon told to stop): returning was right
            if error is None:
                log.warning("daemon %s returned while it should run; restarting", self.spec.name)
                error = "start function returned"
            self.restarts += 1
            failures = 1 if time.monotonic() - started > RESTART_BACKOFF[1] * 3 else failures + 1
            self._write_record("restarting", context, error)
            if self._keeper is not None and failures >= FAILURES_BEFORE_STEPPING_ASIDE:
                log.warning("daemon %s failed %d times in a row here; letting another node try",
                            self.spec.name, failures)
                self._keeper.step_aside(self.leases.ttl * STEP_ASIDE_TIMEOUTS if self.leases else 10.0)
                return
            if context.stopping.wait(delay):
                break
            delay = min(RESTART_BACKOFF[1], delay * 2)

    def _call_stop(self) -> None:
        if self.spec.stop_fn is None:
            return
        try:
            with self.app.app_context():
                self.spec.stop_fn()
        except Exception:
            log.exception("daemon %s: stop function failed", self.spec.name)

    def _write_record(self, state: str, context: DaemonContext | None = None, error: str | None = None) -> None:
        fence = context.fence if context else None
        if context is not None and not context.valid():
            return  # no longer the holder: the record is the new holder's to write
        record = {
            "name": self.spec.name, "singleton": self.spec.singleton, "node": self.node, "pid": os.getpid(),
            "state": state, "since": time.time(), "fencing_token": fence, "restarts": self.restarts,
            "last_error": error,
        }
        try:
            self._record_script(keys=[self.keys.daemons],
                                args=[self.record_field, json.dumps(record), "" if fence is None else fence,
                                      f"{self.node}:{os.getpid()}"])
        except redis.RedisError as exc:
            log.debug("daemon %s: status record not written: %s", self.spec.name, exc)
