"""Start-up without full garbage collections.

A command or a runtime spends its start importing Flask, redis-py, Dramatiq and the app: hundreds
of thousands of objects, none of them garbage. CPython's collector counts them as allocations and
runs full collections over everything imported so far as they pile up, and several more while the
interpreter exits; in ``flask immutant status`` that was about 90 ms of 330 (bench/README.md). So
while one of our processes starts, the young generation's threshold is raised (collections stay
possible, only rarer); once it has started, what start-up made is frozen (moved to the permanent
generation: no later collection scans it, and a fork shares those pages) and the usual thresholds
come back; and as the interpreter exits, the heap is frozen before its teardown collections.
"""

from __future__ import annotations

import atexit
import gc

#: The young generation's threshold while a process starts (CPython's default is 700 or 2,000).
START_UP_THRESHOLD = 200_000

_usual: tuple[int, int, int] | None = None
_exit_registered = False


def starting() -> None:
    """Collect rarely until :func:`started` or :func:`finished` (idempotent; a forked child
    inherits it)."""
    global _usual, _exit_registered
    if _usual is None:
        _usual = gc.get_threshold()
        gc.set_threshold(max(START_UP_THRESHOLD, _usual[0]), _usual[1], _usual[2])
    if not _exit_registered:
        # atexit runs before the teardown's collections: with the heap frozen they scan nothing.
        atexit.register(gc.freeze)
        _exit_registered = True


def started() -> None:
    """A process that keeps running has started: freeze what start-up made, collect as usual."""
    if _usual is not None:
        gc.freeze()
        finished()


def finished() -> None:
    """A command has returned: the usual thresholds again (a process that invoked it in-process,
    a test say, goes on collecting as before; its heap is not frozen)."""
    global _usual
    if _usual is not None:
        gc.set_threshold(*_usual)
        _usual = None
