"""Singleton and per-node daemons: ``daemons.declare(name, start_fn, stop_fn)`` (or the
extension's ``@immutant.daemon(name)``; ``start`` is the old name of ``declare``).

``start_fn`` runs in its own thread inside the app context and should run until ``stop_fn`` is
called (or :func:`current` says to stop). A singleton runs on exactly one node of the cluster,
under a lease; if that node dies the daemon starts on another within the failure timeout plus a
small margin, and a graceful stop hands it over at once. Called at import time (module level of
the app), ``declare`` only registers the daemon; it runs once the app runtime has started.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..moved import lazy_dir, lazy_or_moved
from ..state import declare as _declare
from ..state import get_state, require_feature, with_context

if TYPE_CHECKING:
    from flask import Flask

    from .runner import DaemonContext

#: Imported on first use, so that loading the plugin (every CLI command does) stays light.
_LAZY = {"DaemonContext": ".runner"}


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, {})


def __dir__() -> list[str]:
    return lazy_dir(globals(), _LAZY)


__all__ = ["DaemonContext", "current", "declare", "fencing_token", "start", "stop"]


def declare(
    name: str,
    start_fn: Callable[..., Any],
    stop_fn: Callable[[], Any] | None = None,
    *,
    singleton: bool = True,
    app: Flask | None = None,
) -> None:
    """Declare daemon ``name`` (idempotent by name: declaring it again replaces it); it runs once
    the app runtime has started. ``start_fn`` may take the :class:`DaemonContext` as its argument.

    Without ``app``: the current app, else the app initialised last, else the next app
    initialised (a module-level declaration in an app factory's module).
    Raises :class:`~flask_immutant.ImmutantConfigError` if ``IMMUTANT_DAEMONS`` is off."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a daemon needs a name, got {name!r}")
    if not callable(start_fn) or (stop_fn is not None and not callable(stop_fn)):
        raise TypeError("start_fn and stop_fn must be callables")
    from .registry import registry
    from .runner import DaemonSpec
    from .runner import current as _current

    spec = DaemonSpec(name, with_context(start_fn, _current), stop_fn, singleton)

    def apply(target: Flask) -> None:
        registry(state=require_feature(get_state(target), "daemons")).add(spec)

    _declare(app, apply)


#: The name before the one vocabulary (``start`` declared and ran): still works.
start = declare


def stop(name: str, *, app: Flask | None = None) -> bool:
    """Stop daemon ``name`` here and forget it; a singleton is released (another node may take it
    if it still declares it). Returns False if no such daemon was declared."""
    from .registry import registry

    return registry(app).remove(name)


def current() -> DaemonContext | None:
    """The context of the daemon running on this thread (fencing token, ``valid()``, ``wait()``)."""
    from .runner import current as _current

    return _current()


def fencing_token() -> int | None:
    """The fencing token of the singleton daemon running on this thread."""
    from .runner import current as _current

    context = _current()
    return context.fence if context else None
