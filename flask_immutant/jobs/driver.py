"""The scheduler of one app runtime: fires singleton jobs while it holds the app's scheduler
lease, and its own node's non-singleton jobs always.

A due time later than :data:`MISFIRE_AFTER` failure timeouts is a misfire (no scheduler ran);
anything earlier, such as the seconds a scheduler failover takes, is caught up due time by due
time, so a failover loses and repeats nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from ..loops import Loop
from ..metrics import definitions as metrics
from ..tracing import job_span
from .spec import JobSpec
from .store import JobStore

if TYPE_CHECKING:
    from flask import Flask

    from ..cluster.lease import LeaseKeeper, LeaseManager

log = logging.getLogger("flask_immutant.jobs")

#: Lateness, in failure timeouts, beyond which a due time counts as a misfire.
MISFIRE_AFTER = 5
#: Longest sleep between looks at the schedule (a job added elsewhere is seen within this).
MAX_SLEEP = 0.5
#: Threads running job functions in one app runtime.
JOB_THREADS = 4


class JobDriver:
    def __init__(self, app: Flask, store: JobStore, node: str, failure_timeout: float,
                 functions: dict[str, Callable[[], Any]], specs: dict[str, JobSpec]) -> None:
        self.app = app
        self.store = store
        self.node = node
        self.misfire_after = MISFIRE_AFTER * failure_timeout
        self.functions = functions
        self.specs = specs
        self.keeper: LeaseKeeper | None = None
        self._holding = threading.Event()
        self._loop = Loop("scheduler", self._step, MAX_SLEEP)
        self._stop = self._loop.stopping
        self._local_next: dict[str, float | None] = {}
        self._local_fired: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(JOB_THREADS, thread_name_prefix="immutant-job")

    def start(self, leases: LeaseManager, lease_name: str) -> None:
        self.keeper = leases.keeper(lease_name, lambda fence: self._holding.set(), self._holding.clear)
        self._loop.start()

    def changed(self) -> None:
        """Specs were added or removed here: look at the schedule now."""
        self._loop.wake()

    def stop(self) -> None:
        self._stop.set()
        if self.keeper is not None:
            self.keeper.stop(release=True)
        self._loop.stop(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- loop ---

    def _step(self) -> float:
        """Fire what is due (singletons only while the lease is valid); the wait until the next due time."""
        now = time.time()
        next_wake = min(now + MAX_SLEEP, self._fire_local(now))
        if self._holding.is_set() and self.keeper is not None and self.keeper.valid():
            self._fire_singletons(now)
            upcoming = self.store.next_due()
            if upcoming is not None:
                next_wake = min(next_wake, upcoming)
        return next_wake - time.time()

    def _fire_singletons(self, now: float) -> None:
        for name, due in self.store.due(now):
            spec = self.specs.get(name)
            if spec is None or not spec.singleton or name not in self.functions:
                continue  # declared by another app version: leave it to a scheduler that has it
            if self.keeper is None or not self.keeper.valid():
                return
            late = now - due
            if late > self.misfire_after:
                fire = spec.misfire == "fire_once"
                next_due = spec.next_due_after_now(due, now)
                log.warning("job %s misfired (%.1fs late): %s", name, late, "firing once" if fire else "skipped")
                metrics.JOB_MISFIRES.inc(name, "fired_once" if fire else "skipped")
            else:
                fire, next_due = True, spec.next_due(due)
            if self.store.claim(spec, due, next_due, self.node, fire) == 1:
                self._submit(spec, due)

    def _fire_local(self, now: float) -> float:
        """Non-singleton jobs, on every node: kept in memory; ``limit`` and ``until`` count per node."""
        soonest = now + MAX_SLEEP
        for name, spec in list(self.specs.items()):
            if spec.singleton or name not in self.functions:
                continue
            if name not in self._local_next:
                self._local_next[name] = spec.first_due(now)
            due = self._local_next[name]
            if due is None:
                continue
            if due <= now:
                fired = self._local_fired.get(name, 0) + 1
                self._local_fired[name] = fired
                self._submit(spec, due)
                following = spec.next_due(due)
                if following is not None and following <= now:
                    following = spec.next_due_after_now(due, now)
                if spec.limit is not None and fired >= spec.limit:
                    following = None
                self._local_next[name] = due = following
            if due is not None:
                soonest = min(soonest, due)
        return soonest

    def forget_local(self, name: str) -> None:
        self._local_next.pop(name, None)
        self._local_fired.pop(name, None)

    def _submit(self, spec: JobSpec, due: float) -> None:
        function = self.functions.get(spec.name)
        if function is None:
            return
        self._pool.submit(self._call, spec, function, due)

    def _call(self, spec: JobSpec, function: Callable[[], Any], due: float) -> None:
        _local.fire = Fire(spec.name, due, self.node)
        metrics.JOB_FIRES.inc(spec.name)
        metrics.JOB_LATENESS_SECONDS.observe(max(0.0, time.time() - due), spec.name)
        try:
            with self.app.app_context(), job_span(self.app, spec.name, due, spec.singleton):
                function()
        except Exception as exc:
            log.exception("job %s (due %.3f) raised; its schedule goes on", spec.name, due)
            if spec.singleton:
                try:
                    self.store.record_error(spec.name, f"{type(exc).__name__}: {exc}")
                except redis.RedisError:
                    pass
        finally:
            _local.fire = None


@dataclass(frozen=True)
class Fire:
    """The firing a job function is running for: use ``due`` as an idempotency key."""

    name: str
    due: float
    node: str


_local = threading.local()


def current() -> Fire | None:
    """The firing running on this thread, inside a job function."""
    return getattr(_local, "fire", None)
