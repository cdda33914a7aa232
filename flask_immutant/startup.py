"""Start-up without full garbage collections.

A command or a runtime spends its start importing Flask, redis-py, Dramatiq and the app: hundreds
of thousands of objects, none of them garbage. CPython's collector counts them as allocations and
runs full collections over everything imported so far as they pile up, and several more while the
interpreter exits; in ``flask immutant status`` that was about 90 ms of 330 (bench/README.md). So
while one of our processes starts, the young generation's threshold is raised (collections stay
possible, only rarer); once it has started, what start-up made is frozen (moved to the permanent
generation: no later collection scans it, and a fork shares those pages) and the usual thresholds
come back; and a ``flask immutant`` process freezes its heap as it exits, before the teardown's
collections. A command that keeps running calls :func:`started` once it serves.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys

#: The young generation's threshold while a process starts (CPython's default is 700 or 2,000).
START_UP_THRESHOLD = 200_000

_usual: tuple[int, int, int] | None = None
_freezes_at_exit = False


def starting() -> None:
    """Collect rarely until :func:`started` or :func:`finished` (idempotent; a forked child
    inherits it)."""
    global _usual
    if _usual is None:
        _usual = gc.get_threshold()
        gc.set_threshold(max(START_UP_THRESHOLD, _usual[0]), _usual[1], _usual[2])


def started() -> None:
    """A process that keeps running has started: freeze what start-up made, collect as usual."""
    if _usual is not None:
        gc.freeze()
        finished()


def finished() -> None:
    """Start-up is over: the usual thresholds again, unless the app set its own meanwhile. A
    process that freezes its heap at exit freezes it now: with the usual threshold back, its next
    allocation would start a young collection of all the command made (9 ms after ``status``)."""
    global _usual
    if _usual is not None:
        if _freezes_at_exit:
            gc.freeze()
        if gc.get_threshold()[0] == max(START_UP_THRESHOLD, _usual[0]):
            gc.set_threshold(*_usual)
        _usual = None


def freeze_at_exit() -> None:
    """In a process that is a ``flask`` command itself (not a test or script that runs one in
    process, whose heap and exit are its own): freeze the heap before the interpreter's teardown
    collections (atexit runs first), which would otherwise scan all of it again."""
    global _freezes_at_exit
    if not _freezes_at_exit and _is_flask_program():
        atexit.register(gc.freeze)
        _freezes_at_exit = True


def _is_flask_program() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name in ("flask", "flask.__main__")  # python -m flask
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] == "flask"  # the console script
