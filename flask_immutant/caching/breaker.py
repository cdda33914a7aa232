"""A circuit breaker in front of the cluster store, so a dead store costs one timeout, not one per call.

Closed: calls go through. A connection error opens it for ``reset_after`` seconds, during which
callers are told not to try (a cache misses, a session answers 503) at no cost. Then one caller
is let through as a trial; its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import ImmutantError
from ..metrics import definitions as metrics
from ..store.outage import STORE_ERRORS, is_client_fault, is_outage

T = TypeVar("T")

#: Seconds the breaker stays open before one trial call is let through.
RESET_AFTER = 1.0


class StoreDown(ImmutantError):
    """What :meth:`CircuitBreaker.call` raises instead of calling, or instead of an outage's error:
    the caller answers as for an unavailable store (a cache misses, a session answers 503).
    ``cause``: the exception of the call (None when the open breaker refused it); ``client_fault``:
    it was raised inside redis-py, not by the store (see ``store.outage.is_client_fault``)."""

    def __init__(self, reason: str, cause: BaseException | None = None, client_fault: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        self.client_fault = client_fault


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

    def call(self, op: Callable[[], T]) -> T:
        """``op()`` unless the breaker is open. An outage opens it and a failure inside the store
        client leaves it closed, both raised as :class:`StoreDown`; any other error (an error reply
        that is no outage, a bug) is raised as it is. Neither of those says anything about the store,
        so a trial call ending in one lets the next caller try."""
        if not self.allow():
            raise StoreDown(self.reason)
        try:
            result = op()
        except STORE_ERRORS as exc:
            if not is_outage(exc):
                self.abandoned()
                raise
            self.failure(exc)
            raise StoreDown(f"{type(exc).__name__}: {exc}", exc) from exc
        except BaseException as exc:
            self.abandoned()
            if not is_client_fault(exc):
                raise
            raise StoreDown(f"{type(exc).__name__} inside the store client: {exc}", exc, client_fault=True) from exc
        self.success()
        return result

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
