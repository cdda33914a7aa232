"""Runtimes told to stop, waited for off their caller's thread.

A redeploy displaces a runtime that may drain for up to ``IMMUTANT_SHUTDOWN_TIMEOUT`` (a request
in progress, a client that sends half a request or does not read). The deployer hands it to
:class:`DrainingRuntimes` and goes on with the next deployment or restart: one
:class:`~flask_immutant.loops.Loop` notices when each runtime exits, or kills it at its deadline,
then runs what its caller asked for (closing its listener, say). The node's stop waits for the
runtimes still draining (killing them at their deadlines), so none outlives its node; a SIGKILLed
node's draining runtimes die with it like any runtime of it (lifeline pipe, parent-death signal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..loops import Loop
from .supervisor import RuntimeProcess

log = logging.getLogger("flask_immutant.node")

#: Seconds between two looks at whether the draining runtimes exited.
DRAIN_POLL = 0.05
#: Longest sleep of the loop while nothing drains (a new drain wakes it at once).
IDLE_SLEEP = 60.0


@dataclass(eq=False)
class Drain:
    """One runtime told to stop: killed if it still runs at ``deadline`` (monotonic); ``then``
    runs once it is gone."""

    runtime: RuntimeProcess
    deadline: float
    then: Callable[[], None] | None = None


class DrainingRuntimes:
    """The runtimes a node told to stop and waits for, in the background."""

    def __init__(self) -> None:
        self._drains: list[Drain] = []
        self._lock = threading.Lock()
        # The interval bounds the retry after an unexpected error (the step itself sleeps longer
        # while nothing drains, and a new drain wakes it).
        self._loop = Loop("runtime-drains", self._step, DRAIN_POLL)

    def start(self) -> None:
        self._loop.start()

    def begin(self, runtime: RuntimeProcess, timeout: float, then: Callable[[], None] | None = None) -> None:
        """SIGTERM ``runtime`` and return at once: it is killed if it still runs ``timeout``
        seconds from now (the runtime itself gives up draining a margin before,
        :func:`~flask_immutant.server.runtime.drain_timeout`). ``then`` runs once it is gone."""
        runtime.terminate()
        with self._lock:
            self._drains.append(Drain(runtime, time.monotonic() + timeout, then))
        self._loop.wake()

    def stop(self) -> None:
        """The node stops: wait for every runtime still draining until its own deadline, killing
        it there, then run its ``then``. All of them were told to stop already, so this takes as
        long as the last deadline, not the sum."""
        self._loop.stop()
        with self._lock:
            drains, self._drains = self._drains, []
        for drain in drains:
            try:
                _finish(drain)
            except Exception:  # the others are still waited for
                log.exception("finishing the stop of app runtime %s failed", drain.runtime.target.label)

    def _step(self) -> float:
        """Finish the drains whose runtime exited or whose deadline passed; sleep until the next
        look. A drain whose finish fails is logged and dropped, so it never holds up the others."""
        now = time.monotonic()
        with self._lock:
            due = [d for d in self._drains if d.deadline <= now or d.runtime.poll() is not None]
        for drain in due:
            with self._lock:
                self._drains.remove(drain)
            try:
                _finish(drain)
            except Exception:  # dropped, not retried: its runtime was killed, or its pipes closed
                log.exception("finishing the stop of app runtime %s failed", drain.runtime.target.label)
        with self._lock:
            deadlines = [drain.deadline for drain in self._drains]
        if not deadlines:
            return IDLE_SLEEP
        return max(0.0, min(DRAIN_POLL, min(deadlines) - time.monotonic()))


def _finish(drain: Drain) -> None:
    drain.runtime.finish_stop(drain.deadline)  # it exited, or it is killed: its pipes are closed
    then, drain.then = drain.then, None
    if then is not None:
        then()
