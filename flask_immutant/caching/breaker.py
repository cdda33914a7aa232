"""A circuit breaker in front of the cluster store, so a dead store costs one timeout, not one per call.

Closed: calls go through. A connection error opens it for ``reset_after`` seconds, during which
callers are told not to try (a cache misses, a session answers 503) at no cost. Then one caller
is let through as a trial; its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import logging
import threading
import time

from ..metrics import definitions as metrics

#: Seconds the breaker stays open before one trial call is let through.
RESET_AFTER = 1.0


class CircuitBreaker:
    """Thread-safe; logs once when it opens (with the reason) and once when it closes again."""

    def __init__(self, what: str, logger: logging.Logger, reset_after: float = RESET_AFTER) -> None:
        self.what = what
        self.log = logger
        self.reset_after = reset_after
        self._lock = threading.Lock()
        self._open_until = 0.0
        self._open = False
        self._trial = False
        #: The reason of the last opening, for status and error messages.
        self.reason = ""
        #: How many calls were refused while open.
        self.refused = 0
        metrics.BREAKER_OPEN.set(0, what)

    @property
    def state(self) -> str:
        with self._lock:
            if not self._open:
                return "closed"
            return "half-open" if time.monotonic() >= self._open_until else "open"

    def allow(self) -> bool:
        """Whether to call the store now. Fast when closed (no lock)."""
        if not self._open:
            return True
        with self._lock:
            if not self._open:
                return True
            if not self._trial and time.monotonic() >= self._open_until:
                self._trial = True
                return True
            self.refused += 1
            return False

    def success(self) -> None:
        if not self._open:
            return
        with self._lock:
            if self._open:
                self._open = self._trial = False
                metrics.BREAKER_OPEN.set(0, self.what)
                self.log.warning("%s: cluster store reachable again; circuit closed", self.what)

    def abandoned(self) -> None:
        """A call ended saying nothing about the store (a client-side fault, an error reply that
        is no outage): if it was the trial, let the next caller try, rather than stay open for good."""
        if not self._open:
            return
        with self._lock:
            self._trial = False

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            first = not self._open
            self._open, self._trial = True, False
            self._open_until = time.monotonic() + self.reset_after
            self.reason = f"{type(exc).__name__}: {exc}"
        if first:
            metrics.BREAKER_OPEN.set(1, self.what)
            self.log.warning(
                "%s: cluster store unavailable (%s); circuit open, retrying every %gs",
                self.what, self.reason, self.reset_after,
            )
