"""Start-up without full garbage collections.

A command or a runtime spends its start importing Flask, redis-py, Dramatiq and the app: hundreds
of thousands of objects, none of them garbage. CPython's collector counts them as allocations and
runs a full collection over everything imported so far every few tens of thousands of them; in
``flask immutant status`` that was 30 ms of ~330 (bench/README.md). So while a process starts, the
young generation's threshold is raised (collections stay possible, only rarer: a process that never
says it has started still collects), and once it has started, what start-up made is frozen (moved
to the permanent generation: no later collection scans it again, and a fork shares those pages)
and the usual thresholds come back.
"""

from __future__ import annotations

import gc

#: The young generation's threshold while a process starts (CPython's default is 2,000 or 700).
START_UP_THRESHOLD = 200_000

_usual: tuple[int, int, int] | None = None


def starting() -> None:
    """Collect rarely until :func:`started` (idempotent; a forked child inherits it)."""
    global _usual
    if _usual is None:
        _usual = gc.get_threshold()
        gc.set_threshold(max(START_UP_THRESHOLD, _usual[0]), _usual[1], _usual[2])


def started() -> None:
    """Start-up is over: freeze what it made, and collect as usual from here on."""
    global _usual
    if _usual is not None:
        gc.freeze()
        gc.set_threshold(*_usual)
        _usual = None


def ending() -> None:
    """The command is done: freeze what is left, so the interpreter's exit, which collects more than
    once while it unloads modules, does not scan it all again (60 ms of ``status``)."""
    gc.freeze()
