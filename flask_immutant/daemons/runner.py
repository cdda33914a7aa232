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

from .. import events, lua
from ..cluster.lease import SAFETY_MARGIN, LeaseKeeper
from ..loops import Backoff, Loop
from ..metrics import definitions as metrics
from ..tracing import daemon_span

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
#: Seconds between tries of a status record the store refused or did not answer.
RECORD_RETRY = 0.5
#: Seconds a stopping daemon waits for its last record ("stopped") to be written.
RECORD_FLUSH = 1.0


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
        self._records = RecordWriter(store, keys.daemons, self.record_field, spec.name)

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
        self._records.close(RECORD_FLUSH)

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
        backoff = Backoff(*RESTART_BACKOFF)
        self._write_record("running", context)
        while not context.stopping.is_set():
            log.info("daemon %s starting on %s%s", self.spec.name, self.node,
                     f" (fencing token {context.fence})" if context.fence is not None else "")
            error = None
            started = time.monotonic()
            try:
                with self.app.app_context(), daemon_span(self.app, self.spec.name, self.spec.singleton, context.fence):
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
            delay = backoff.next_delay(time.monotonic() - started)
            failures = backoff.failures
            events.emit("daemon.restarted", daemon=self.spec.name, restarts=self.restarts, error=error)
            metrics.DAEMON_RESTARTS.inc(self.spec.name)
            self._write_record("restarting", context, error)
            if self._keeper is not None and failures >= FAILURES_BEFORE_STEPPING_ASIDE:
                log.warning("daemon %s failed %d times in a row here; letting another node try",
                            self.spec.name, failures)
                self._keeper.step_aside(self.leases.ttl * STEP_ASIDE_TIMEOUTS if self.leases else 10.0)
                return
            if context.stopping.wait(delay):
                break

    def _call_stop(self) -> None:
        if self.spec.stop_fn is None:
            return
        try:
            with self.app.app_context():
                self.spec.stop_fn()
        except Exception:
            log.exception("daemon %s: stop function failed", self.spec.name)

    def _write_record(self, state: str, context: DaemonContext | None = None, error: str | None = None) -> None:
        """Hand the record to the writer; never waits on the store (see :class:`RecordWriter`)."""
        fence = context.fence if context else None
        if context is not None and not context.valid():
            return  # no longer the holder: the record is the new holder's to write
        record = {
            "name": self.spec.name, "singleton": self.spec.singleton, "node": self.node, "pid": os.getpid(),
            "state": state, "since": time.time(), "fencing_token": fence, "restarts": self.restarts,
            "last_error": error,
        }
        self._records.post(record, context.valid if context is not None else None)


class RecordWriter:
    """Writes one daemon's status records, latest first, on a thread of its own.

    A holder must act as soon as its lease is confirmed: writing "running" first, on the runtime's
    general store client, held a new holder back 14-21 s while that client still waited on a
    primary lost in a partition. Only the latest record matters; one the store did not take is
    tried again until a newer one replaces it or its holder's lease is gone.
    """

    def __init__(self, store: redis.Redis, key: str, field: str, daemon: str) -> None:
        self.key = key
        self.field = field
        self._script = lua.script(store, "daemons/runner_record")
        self._pending: tuple[dict[str, Any], Callable[[], bool] | None] | None = None
        self._lock = threading.Lock()
        self._written = threading.Event()
        self._loop = Loop(f"daemon-record-{daemon}", self._write, 60.0).start()

    def post(self, record: dict[str, Any], still_holder: Callable[[], bool] | None = None) -> None:
        """Write ``record`` soon, unless ``still_holder()`` is false by then."""
        with self._lock:
            self._pending = (record, still_holder)
            self._written.clear()
        self._loop.wake()

    def close(self, flush: float) -> None:
        """Wait up to ``flush`` seconds for the last record, then stop."""
        self._written.wait(flush)
        self._loop.stop(timeout=flush)

    def _write(self) -> float | None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        record, still_holder = pending
        if still_holder is None or still_holder():
            fence = record["fencing_token"]
            try:
                self._script(keys=[self.key], args=[self.field, json.dumps(record), "" if fence is None else fence,
                                                    f"{record['node']}:{record['pid']}"])
            except redis.RedisError as exc:
                log.debug("daemon %s: status record not written yet: %s", record["name"], exc)
                with self._lock:
                    if self._pending is None:
                        self._pending = pending
                return RECORD_RETRY
        with self._lock:
            if self._pending is None:
                self._written.set()
        return None
