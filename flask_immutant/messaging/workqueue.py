"""Dramatiq's work queue, made closable: a stopping engine wakes its idle worker threads at once
instead of leaving each in ``get(timeout=worker_timeout)`` until the timeout passes (up to 1 s,
most of a node's stop time)."""

from __future__ import annotations

import time
from queue import Empty, PriorityQueue
from typing import Any


class ClosableWorkQueue(PriorityQueue[Any]):
    """A :class:`PriorityQueue` whose blocked ``get`` calls end (``Empty``) once :meth:`close` is
    called; queued items are still handed out, so none is lost to the close."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        with self.not_empty:
            self.closed = True
            self.not_empty.notify_all()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self.not_empty:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._qsize():
                if self.closed or not block:
                    raise Empty
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Empty
                self.not_empty.wait(remaining)
            item = self._get()
            self.not_full.notify()
            return item
