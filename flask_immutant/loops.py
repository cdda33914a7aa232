"""One way to run a background loop: wake, do one step, survive anything, report health.

Every long-running thread of the package is a :class:`Loop`. A step that raises is logged with
its loop's name and traceback the first time, and again only when the error changes; the rest
are counted. The loop then backs off (:func:`backoff_delay`, one policy for all; :class:`Backoff`
is the same policy for restarts) and carries on.
Each process publishes the :class:`Health` of its loops to the store (:class:`HealthReporter`),
and ``flask immutant status`` reports it: a node whose loop keeps failing is unhealthy.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

    from .keys import Keys

log = logging.getLogger("flask_immutant.loops")

#: Consecutive failed steps from which a loop (and so its node) counts as unhealthy.
UNHEALTHY_AFTER = 2
#: Backoff after failed steps: first delay and cap, in seconds (never below the loop's interval).
BACKOFF = (0.1, 5.0)

Step = Callable[[], "float | None"]


def backoff_delay(failures: int, interval: float, cap: float | None = None) -> float:
    """Seconds to wait after the ``failures``-th failed step in a row of a loop with ``interval``:
    doubling from the interval (at least the first delay) up to ``cap`` (default: the cap)."""
    first, default_cap = BACKOFF
    cap = max(default_cap if cap is None else cap, interval)
    return min(cap, max(interval, first) * 2.0 ** min(failures - 1, 16))


class Backoff:
    """The restart backoff of something that keeps failing (an app runtime, a daemon): the same
    doubling as :func:`backoff_delay`, from ``first`` up to ``cap``; a run that lasted
    ``reset_after`` seconds or more starts the doubling over."""

    def __init__(self, first: float, cap: float, reset_after: float | None = None) -> None:
        self.first = first
        self.cap = cap
        self.reset_after = cap * 3 if reset_after is None else reset_after
        self.failures = 0

    def next_delay(self, ran_for: float = 0.0) -> float:
        """The delay before the next try, after a failure of a run that lasted ``ran_for`` s."""
        self.failures = 1 if ran_for >= self.reset_after else self.failures + 1
        return min(self.cap, self.first * 2.0 ** min(self.failures - 1, 16))

    def reset(self) -> None:
        """A try worked: the next failure waits ``first`` again."""
        self.failures = 0


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


@dataclass
class Health:
    """How one loop is doing: what ``status`` shows for it."""

    name: str
    state: str = "starting"  # starting, running, failing, stopped, dead
    last_success: float | None = None
    consecutive_failures: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def healthy(self) -> bool:
        return self.state != "dead" and self.consecutive_failures < UNHEALTHY_AFTER

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state, "healthy": self.healthy,
            "last_success": _iso(self.last_success), "consecutive_failures": self.consecutive_failures,
            "failures": self.failures, "last_error": self.last_error, "last_error_at": _iso(self.last_error_at),
        }


class Loop:
    """A daemon thread calling ``step()`` until stopped.

    ``step`` returns the seconds until the next step (``None``: ``interval``). Between steps the
    loop sleeps until that delay passes, :meth:`wake` is called or the loop is stopped. With
    ``wait_first`` the first step comes after one interval (heartbeats, which were just sent).
    ``on_error(exc)`` runs after a failed step, to drop what the step may have left broken (a
    pub/sub connection, a lease it can no longer vouch for); its own failure is logged, not fatal.
    ``stop_event``: an event the owner sets to stop the loop, shared with other work.
    ``backoff_cap``: the longest wait after failures, for loops whose cadence is a promise
    (heartbeats, lease renewals: ``interval`` keeps them on time).
    ``interrupt()``: called by :meth:`stop` once the stop is asked, to end a wait the step may be
    blocked in (a pub/sub read: :meth:`~flask_immutant.store.connect.Subscription.interrupt`), so
    a stop never waits out a step's timeout.
    """

    def __init__(self, name: str, step: Step, interval: float, *, wait_first: bool = False,
                 on_error: Callable[[BaseException], None] | None = None,
                 stop_event: threading.Event | None = None, backoff_cap: float | None = None,
                 interrupt: Callable[[], None] | None = None) -> None:
        self.name = name
        self.interrupt = interrupt
        self.backoff_cap = backoff_cap
        self.step = step
        self.interval = interval
        self.wait_first = wait_first
        self.on_error = on_error
        self.stopping = stop_event if stop_event is not None else threading.Event()
        self.health = Health(name)
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"immutant-{name}", daemon=True)
        self._logged: str | None = None

    def start(self) -> Loop:
        _register(self)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Ask the loop to stop and wait (bounded) for its current step to end."""
        self.stopping.set()
        self._wake.set()
        if self.interrupt is not None:
            try:
                self.interrupt()
            except Exception:
                log.exception("%s: interrupting the step failed; waiting for it", self.name)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        _unregister(self)

    def wake(self) -> None:
        """Run the next step now instead of after the delay."""
        self._wake.set()

    def mark_healthy(self) -> None:
        """For a step that runs long (a tracking connection): it works now, whatever failed before."""
        self._succeeded()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def current_health(self) -> Health:
        """The health, with a thread that ended without being stopped reported as dead."""
        if not self._thread.is_alive() and self._thread.ident is not None and not self.stopping.is_set():
            self.health.state = "dead"
        return self.health

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and not self.stopping.is_set():
            self._wake.wait(seconds)
        self._wake.clear()

    def _run(self) -> None:
        health = self.health
        health.state = "running"
        if self.wait_first:
            self._sleep(self.interval)
        try:
            while not self.stopping.is_set():
                try:
                    delay = self.step()
                except Exception as exc:  # a background loop survives anything
                    if self.stopping.is_set():
                        self._clean_up(exc)
                        break
                    delay = self._failed(exc)
                else:
                    self._succeeded()
                self._sleep(self.interval if delay is None else delay)
        finally:
            health.state = "stopped" if self.stopping.is_set() else "dead"
            _changed()

    def _succeeded(self) -> None:
        health = self.health
        if health.consecutive_failures:
            log.warning("%s: recovered after %d failed step(s) (last error: %s)", self.name,
                        health.consecutive_failures, health.last_error)
            self._logged = None
            health.consecutive_failures = 0
            health.state = "running"
            _changed()
        health.last_success = time.time()

    def _failed(self, exc: BaseException) -> float:
        health = self.health
        error = f"{type(exc).__name__}: {exc}"
        was_healthy = health.healthy
        health.failures += 1
        health.consecutive_failures += 1
        health.last_error, health.last_error_at = error, time.time()
        health.state = "failing"
        delay = backoff_delay(health.consecutive_failures, self.interval, self.backoff_cap)
        if self._logged != error:
            log.error("%s: step failed (%s); retrying in %.1fs, later failures like this one are only counted",
                      self.name, error, delay, exc_info=exc)
            self._logged = error
        else:
            log.debug("%s: step failed again (%d in a row): %s", self.name, health.consecutive_failures, error)
        if was_healthy != health.healthy:
            _changed()
        self._clean_up(exc)
        return delay

    def _clean_up(self, exc: BaseException) -> None:
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:
                log.exception("%s: cleaning up after a failed step failed too", self.name)


# --- the loops of this process ----------------------------------------------------------------

_lock = threading.Lock()
_loops: list[Loop] = []
_listeners: list[Callable[[], None]] = []


def _register(loop: Loop) -> None:
    with _lock:
        _loops.append(loop)


def _unregister(loop: Loop) -> None:
    with _lock:
        if loop in _loops:
            _loops.remove(loop)


def _changed() -> None:
    """A loop became healthy or unhealthy: tell the reporter, so status shows it at once."""
    for listener in list(_listeners):
        listener()


def running() -> list[Loop]:
    """The loops started in this process and not stopped."""
    with _lock:
        return list(_loops)


# --- publishing health ------------------------------------------------------------------------


class HealthReporter:
    """Publishes the health of this process's loops to the store, with a TTL, every
    ``interval`` and at once when a loop turns healthy or unhealthy. Started once per process
    (node supervisor, app runtime, balancer) by :func:`report_health`."""

    def __init__(self, store: redis.Redis, keys: Keys, node: str, role: str, ttl: float) -> None:
        self.store = store
        self.keys = keys
        self.node = node
        self.role = role
        self.ttl = ttl
        self.process = f"{node}:{socket.gethostname()}:{os.getpid()}"
        self.loop = Loop("health-reporter", self.publish, max(0.1, ttl / 4))

    def document(self) -> dict[str, Any]:
        loops = sorted((loop.current_health().status() for loop in running()), key=lambda h: h["name"])
        return {"node": self.node, "role": self.role, "pid": os.getpid(), "hostname": socket.gethostname(),
                "loops": loops}

    def publish(self) -> None:
        pipe = self.store.pipeline(transaction=False)
        pipe.set(self.keys.loop_health(self.process), json.dumps(self.document()), px=int(self.ttl * 1000))
        pipe.sadd(self.keys.loop_health_index, self.process)
        pipe.execute()

    def withdraw(self) -> None:
        try:
            pipe = self.store.pipeline(transaction=False)
            pipe.delete(self.keys.loop_health(self.process))
            pipe.srem(self.keys.loop_health_index, self.process)
            pipe.execute()
        except Exception as exc:
            log.debug("could not withdraw loop health (%s); it expires", exc)


_reporter: HealthReporter | None = None


def report_health(store: redis.Redis, keys: Keys, node: str, role: str, ttl: float) -> HealthReporter:
    """Start this process's health reporter (the first call wins; later ones get the same)."""
    global _reporter
    with _lock:
        if _reporter is None:
            _reporter = HealthReporter(store, keys, node, role, ttl)
            _listeners.append(_reporter.loop.wake)
            start = True
        else:
            start = False
    if start:
        _reporter.loop.start()
    return _reporter


def stop_reporting() -> None:
    """Stop this process's reporter and remove its record (a stopping process)."""
    global _reporter
    with _lock:
        reporter, _reporter = _reporter, None
        if reporter is not None and reporter.loop.wake in _listeners:
            _listeners.remove(reporter.loop.wake)
    if reporter is not None:
        reporter.loop.stop()
        reporter.withdraw()


def read_health(store: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every live process's loop health (``{node, role, pid, hostname, loops}``), malformed
    records skipped with a warning; records of processes gone are dropped from the index."""
    from .records import parsed_json, set_of, warn

    names = set_of(store, keys.loop_health_index, "loop health record")
    if not names:
        return []
    values = store.mget([keys.loop_health(n) for n in names])
    gone = [n for n, v in zip(names, values, strict=True) if v is None]
    if gone:
        store.srem(keys.loop_health_index, *gone)
    found = []
    for name, raw in zip(names, values, strict=True):
        if raw is None:
            continue
        record = parsed_json(raw, "loop health", name, dict)
        if record is None:
            continue
        loops = record.get("loops")
        if not (isinstance(record.get("node"), str) and isinstance(record.get("role"), str)
                and isinstance(loops, list) and all(_is_health(h) for h in loops)):
            warn(f"skipped the loop health record {name!r}: not the shape reporters write")
            continue
        found.append(record)
    return found


def _is_health(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("name"), str) and isinstance(data.get("healthy"), bool)
            and isinstance(data.get("state"), str) and isinstance(data.get("consecutive_failures"), int))
