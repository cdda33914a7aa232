"""The cost of the cluster event log (a benchmark, not a test).

    python bench/events.py [--events 20000]

1. ``events.emit`` on the caller's thread (what a lease keeper or a failover path pays) against a
   ``logging`` call of the same event to a handler that writes nothing (the peer: what the code
   already paid to log it), in one run; prints the ratio.
2. How fast the background writer gets them into the store (pipelined ``XADD MAXLEN ~``) against
   one ``XADD`` per event from the caller's thread (the peer), on a private embedded store.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from flask_immutant.events import log as event_log
from flask_immutant.keys import Keys
from flask_immutant.store import EmbeddedStore, client_from_url


def per_call(n: int, call: object) -> float:
    started = time.perf_counter()
    for i in range(n):
        call(i)  # type: ignore[operator]
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000)
    args = parser.parse_args()
    n = args.events
    home = Path(tempfile.mkdtemp(prefix="imt-bench-"))
    store = EmbeddedStore(home)
    client = client_from_url(store.ensure_running())
    keys = Keys("bench")
    try:
        client.delete(keys.event_log)
        writer = event_log.EventLog(client, keys, "bench", maxlen=n * 2)
        quiet = logging.getLogger("bench.quiet")
        quiet.addHandler(logging.NullHandler())
        quiet.setLevel(logging.INFO)
        quiet.propagate = False
        logged = per_call(n, lambda i: quiet.info("lease %s acquired by %s (fencing token %d)", "daemon:x", "a", i))
        emitted = per_call(n, lambda i: writer.add("lease.acquired", {"lease": "daemon:x", "fence": i,
                                                                      "failover": False, "previous_node": None}))
        print(f"== on the caller's thread, {n} events ==")
        print(f"    events.emit: {emitted * 1e6:7.2f} µs/event   "
              f"logging.info (null handler): {logged * 1e6:7.2f} µs/event")
        print(f"    ratio (emit / log): {emitted / logged:.2f}")
        started = time.perf_counter()
        assert writer.flush(60.0)
        drained = time.perf_counter() - started
        assert client.xlen(keys.event_log) >= min(n, event_log.QUEUE_LIMIT)
        client.delete(keys.event_log)
        one_by_one = per_call(min(n, 5000), lambda i: client.xadd(keys.event_log, {"kind": "lease.acquired",
                                                                                   "fields": "{}"}))
        written = min(n, event_log.QUEUE_LIMIT)
        print(f"== into the store (the queue keeps the newest {event_log.QUEUE_LIMIT}) ==")
        print(f"    writer, pipelined: {written / drained:9.0f} events/s   "
              f"one XADD per event: {1 / one_by_one:9.0f} events/s")
        print(f"    ratio (writer / one by one): {(written / drained) * one_by_one:.1f}")
    finally:
        client.close()
        store.stop()


if __name__ == "__main__":
    main()
