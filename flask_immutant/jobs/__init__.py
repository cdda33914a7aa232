"""Scheduled jobs: ``jobs.schedule(name, fn, cron=/every=/at=/in_=, until=, limit=)``.

A singleton job (the default) fires exactly once per due time across the cluster, driven by the
runtime that holds the app's scheduler lease; a non-singleton job fires on every node. Names are
ids: scheduling the same name again (as every node does on start-up) updates, never duplicates.
Schedules are stored through rq-scheduler and survive a full cluster restart. Declared at import
time, a job is stored and started once the app runtime starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..moved import lazy_dir, lazy_or_moved
from ..state import declare as _declare
from ..state import get_state, require_feature, with_context

if TYPE_CHECKING:
    from flask import Flask

    from .driver import Fire, current

#: Imported on first use, so that loading the plugin (every CLI command does) never loads croniter.
_LAZY = {"Fire": ".driver", "current": ".driver", "registry": ".registry"}
#: Internals that were public before issue 12: importable here still, with a DeprecationWarning.
MOVED = {"JobSpec": "flask_immutant.jobs.spec.JobSpec"}


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, MOVED)


def __dir__() -> list[str]:
    return lazy_dir(globals(), _LAZY)

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Fire", "current", "fire", "schedule", "stop", "unschedule"]


def schedule(
    name: str,
    fn: Callable[..., Any] | None = None,
    *,
    cron: str | None = None,
    every: Any = None,
    at: Any = None,
    in_: Any = None,
    until: Any = None,
    limit: int | None = None,
    singleton: bool = True,
    misfire: str = "fire_once",
    app: Flask | None = None,
) -> Any:
    """Schedule ``fn`` under ``name``; without ``fn``, a decorator. Raises ``ValueError`` for a
    schedule that cannot be (names the argument, the value and what is allowed) and
    :class:`~flask_immutant.ImmutantConfigError` if ``IMMUTANT_JOBS`` is off. ``fn`` may take the
    :class:`Fire` it runs for as its argument. Without ``app``: as ``daemons.declare``."""
    from .driver import current
    from .registry import registry
    from .spec import JobSpec

    spec = JobSpec.build(name, cron=cron, every=every, at=at, in_=in_, until=until, limit=limit,
                         singleton=singleton, misfire=misfire)

    def register(function: F) -> F:
        if not callable(function):
            raise TypeError(f"job {name!r}: fn must be callable")
        call = with_context(function, current)
        _declare(app, lambda target: registry(state=require_feature(get_state(target), "jobs")).add(spec, call))
        return function

    return register if fn is None else register(fn)


def unschedule(name: str, *, app: Flask | None = None) -> bool:
    """Remove job ``name`` from the cluster (and this app). False if this app did not declare it."""
    from .registry import registry

    return registry(app).remove(name)


#: ``stop`` means "undeclare and stop" in every feature (``messaging.stop``, ``daemons.stop``).
stop = unschedule


def fire(app_name: str, job_name: str) -> None:
    """The function RQ tools see in our stored schedules; flask-immutant fires jobs itself."""
    raise RuntimeError(f"job {app_name}.{job_name} is fired by flask-immutant's scheduler, not by an RQ worker")
