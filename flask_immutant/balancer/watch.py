"""Keep a balancer's routing table fresh: wake on ``contexts_changed``, and poll anyway.

The channel makes appear, withdraw and ``ctl`` changes visible at once; the poll catches what no
one announces — the contexts of a SIGKILLed node expiring at the end of the failure timeout —
and anything said while the subscriber was reconnecting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from ..keys import Keys
from .registry import Backend, routing_table

log = logging.getLogger("flask_immutant.balancer")

Table = dict[str, list[Backend]]

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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name="immutant-balancer-table", daemon=True),
            threading.Thread(target=self._listen, name="immutant-balancer-events", daemon=True),
        ]
        self._store_ok = True

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(2)

    def refresh(self) -> Table:
        """Read the table now (also used once before serving)."""
        table = routing_table(self.store, self.keys)
        changed = table != self.table
        self.table = table
        self.on_tick(table, changed)
        return table

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except redis.RedisError as exc:
                if self._store_ok:
                    log.warning("cannot read contexts (%s); routing with the last table", exc)
                self._store_ok = False
                continue
            except Exception:
                log.exception("balancer tick failed")
                continue
            if not self._store_ok:
                log.info("contexts readable again")
            self._store_ok = True

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self.store.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.keys.contexts_changed)
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        self._wake.set()
            except redis.RedisError as exc:
                log.debug("contexts channel lost (%s); polling until it is back", exc)
                self._stop.wait(self.poll)
            finally:
                try:
                    pubsub.close()
                except redis.RedisError:
                    pass
