"""Keep a balancer's routing table fresh: wake on ``contexts_changed``, and poll anyway.

The channel makes appear, withdraw and ``ctl`` changes visible at once; the poll catches what no
one announces — the contexts of a SIGKILLed node expiring at the end of the failure timeout —
and anything said while the subscriber was reconnecting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from ..contexts.registry import Server, routing_table
from ..keys import Keys
from ..loops import Loop
from ..store.connect import Subscription

log = logging.getLogger("flask_immutant.balancer")

Table = dict[str, list[Server]]

#: Seconds between two reads of the table when nothing was announced.
POLL_INTERVAL = 0.5


class TableWatcher:
    """Calls ``on_tick(table, changed)`` after every read of the table, in its own thread.

    ``changed`` says the table differs from the last one read. A read that fails (the store is
    down) keeps the last table: a balancer goes on routing with what it knew.
    """

    def __init__(self, store: redis.Redis, keys: Keys, on_tick: Callable[[Table, bool], None],
                 poll: float = POLL_INTERVAL) -> None:
        self.store = store
        self.keys = keys
        self.on_tick = on_tick
        self.poll = poll
        self.table: Table = {}
        self._subscription = Subscription(self.store, self.keys.contexts_changed)
        self._table_loop = Loop("balancer-table", self._tick, poll, wait_first=True)
        self._events = Loop("balancer-events", self._listen, 0.0, on_error=self._subscription.drop,
                            interrupt=self._subscription.interrupt)

    def start(self) -> None:
        self._table_loop.start()
        self._events.start()

    def stop(self) -> None:
        self._events.stop(2)
        self._table_loop.stop(2)
        self._subscription.drop()

    def refresh(self) -> Table:
        """Read the table now (also used once before serving, then every poll or change notice).
        A read that fails raises, so the loop reports it and keeps the last table."""
        table = routing_table(self.store, self.keys)
        changed = table != self.table
        self.table = table
        self.on_tick(table, changed)
        return table

    def _tick(self) -> None:
        self.refresh()

    def _listen(self) -> float:
        """Wake the table loop when a context changes (it polls anyway)."""
        if self._subscription.get_message(timeout=0.5) is not None:
            self._table_loop.wake()
        return 0.0

