"""The per-app state flask-immutant keeps in ``app.extensions["immutant"]`` and the helpers every
feature uses to reach it (``get_state``, ``declare``, ``require_feature``).

Split from :mod:`flask_immutant.extension` so that the features import this module and the
extension (the handle, which calls the features) imports them: no import cycle
(tests/test_imports.py). ``flask_immutant.extension`` re-exports every name.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import weakref
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pluggy

from . import plugins
from .errors import ImmutantConfigError, NoAppError
from .keys import Keys
from .once import computed_once
from .protocols import Slot
from .settings import CORE_SETTINGS, Settings, import_paths, resolve, table

if TYPE_CHECKING:
    import redis
    from flask import Flask

    from .cluster import Member
    from .protocols import RuntimeView

T = TypeVar("T")

EXTENSION_KEY = "immutant"


class ImmutantState:
    """Everything flask-immutant knows about one app (or one CLI call without an app):
    its resolved settings, its plugin manager and, on first use, its store client."""

    def __init__(self, settings: Settings, pm: pluggy.PluginManager) -> None:
        self.settings = settings
        self.pm = pm
        self.keys = Keys(settings["IMMUTANT_CLUSTER"])
        #: The app runtime serving this app, once it has started; ``None`` in the node
        #: supervisor and CLI processes. Features register work at import time and start it
        #: only where this is set, so importing an app never starts daemons or consumers.
        self.runtime: RuntimeView | None = None
        #: Per-app objects of feature plugins (their registries), by slot name: typed through
        #: each feature's :class:`~flask_immutant.protocols.Slot` (``get``, ``put``, ``pop``).
        self._slots: dict[str, object] = {}
        #: What the app's jobs, leases and sessions are keyed by (set by ``init_app``): two
        #: deployments whose Flask apps share a name (``app`` from ``app.py``) never share them.
        self.app_id: str | None = None
        self.given_config: dict[str, Any] = {}

    @classmethod
    def build(
        cls,
        config: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
        make_pm: Callable[[tuple[str, ...]], pluggy.PluginManager] = plugins.make_plugin_manager,
    ) -> ImmutantState:
        """Load plugins, collect their settings rows, resolve and validate every value once.
        ``make_pm`` makes the plugin manager from the extra plugins' import paths (the CLI passes
        the one it registered its commands with)."""
        environ = os.environ if environ is None else environ
        pm = make_pm(_extra_plugins(config or {}, environ, overrides or {}))
        rows = list(CORE_SETTINGS)
        for contributed in pm.hook.immutant_settings():
            rows.extend(contributed or ())
        settings = resolve(table(rows), config, environ, overrides)
        plugins.apply_flags(pm, settings)
        state = cls(settings, pm)
        #: The ``IMMUTANT_*`` keys the app's own config gave (``flask immutant config`` shows
        #: where each value came from; after ``init_app`` the config holds them all).
        state.given_config = {k: v for k, v in (config or {}).items() if k.startswith("IMMUTANT_")}
        return state

    @computed_once
    def store(self) -> redis.Redis:
        """The cluster store client; starts the embedded store if this machine has none yet."""
        from .store import client_from_url, store_url

        return client_from_url(store_url(self.settings, start=True))

    @computed_once
    def node_name(self) -> str:
        """This process's node name (set by the node for its app runtimes, else the default)."""
        from .cluster.identity import node_name

        return node_name(self.settings)

    def get(self, slot: Slot[T]) -> T | None:
        """The object a feature keeps in ``slot`` for this app, if it put one."""
        return cast("T | None", self._slots.get(slot.name))

    def put(self, slot: Slot[T], value: T) -> T:
        """Keep ``value`` in ``slot`` (replacing what was there); returns it."""
        self._slots[slot.name] = value
        return value

    def pop(self, slot: Slot[T]) -> T | None:
        """Take the object out of ``slot`` (a feature stopping), if there is one."""
        return cast("T | None", self._slots.pop(slot.name, None))

    def feature(self, slot: Slot[T], factory: Callable[[ImmutantState], T]) -> T:
        """The object in ``slot`` (a registry, a manager), made by ``factory(self)`` on first use."""
        found = self.get(slot)
        if found is None:
            found = self.put(slot, factory(self))
        return found

    @property
    def features(self) -> Mapping[str, object]:
        """Every slot's object by name, read-only (status, debugging): features use their slots."""
        return MappingProxyType(self._slots)

    def members(self) -> list[Member]:
        """The cluster's live members, read from the store (any process, any node)."""
        from .cluster import live_members

        return live_members(self.store, self.keys, self.settings["IMMUTANT_FAILURE_TIMEOUT"])

    def status(self) -> dict[str, Any]:
        """The ``status --json`` document: the schema is in docs/status.md."""
        from .records import collecting
        from .store import existing_store

        document: dict[str, Any] = {"schema": 1, "cluster": self.settings["IMMUTANT_CLUSTER"]}
        with existing_store(self.settings) as store, collecting() as warnings:
            contributed = self.pm.hook.immutant_status(state=self, store=store)
        document["warnings"] = warnings
        for sections in reversed(contributed):
            for name, data in (sections or {}).items():
                if name in document:
                    raise ImmutantConfigError(f"two plugins contribute the status section {name!r}")
                document[name] = data
        json.dumps(document)  # fail here, not in the CLI, if a plugin returned something odd
        return document


def _extra_plugins(
    config: Mapping[str, Any], environ: Mapping[str, str], overrides: Mapping[str, Any]
) -> tuple[str, ...]:
    """``IMMUTANT_PLUGINS`` is needed before the other settings: it decides which rows exist."""
    key = "IMMUTANT_PLUGINS"
    raw: Any = overrides.get(key) or environ.get(key) or config.get(key) or ()
    try:
        return import_paths(raw)
    except ValueError as exc:
        raise ImmutantConfigError(f"IMMUTANT_PLUGINS={raw!r} is not allowed: expected {exc}") from None


#: The plugin behind each switchable feature and the flag that turns it on, so that a feature
#: used while it is off fails at declaration time with the setting to change.
FEATURE_FLAGS: dict[str, tuple[str, str]] = {
    # feature: (plugin module, flag)
    "messaging": ("flask_immutant.messaging.plugin", "IMMUTANT_MESSAGING"),
    "daemons": ("flask_immutant.daemons.plugin", "IMMUTANT_DAEMONS"),
    "jobs": ("flask_immutant.jobs.plugin", "IMMUTANT_JOBS"),
    "cache": ("flask_immutant.caching.plugin", "IMMUTANT_CACHE"),
    "sessions": ("flask_immutant.web.plugin", "IMMUTANT_SESSIONS"),
}


def switched_off(feature: str) -> ImmutantConfigError:
    """The one error for a feature used while its flag is off: it names the flag to set."""
    _plugin, flag = FEATURE_FLAGS[feature]
    return ImmutantConfigError(f"{feature} is switched off for this app: set {flag} = True in its config")


def require_feature(state: ImmutantState, feature: str) -> ImmutantState:
    """``state`` if ``feature`` is on for it, else :func:`switched_off`."""
    plugin, _flag = FEATURE_FLAGS[feature]
    if not state.pm.has_plugin(plugin):
        raise switched_off(feature)
    return state


Declaration = Callable[["Flask"], Any]

#: Declarations made by module functions (``daemons.start(...)`` at module level) with no app
#: given, none current and none initialised yet: the next ``init_app`` applies them.
_pending: list[Declaration] = []
#: The app whose extension was initialised last in this process (weakly: it is not kept alive).
_last_app: weakref.ref[Flask] | None = None


def initialised(app: Flask) -> list[Declaration]:
    """``ImmutantExtension.init_app`` is done with ``app``: it is the app declarations without one
    go to from now on; returns (and forgets) those kept for the next app initialised."""
    global _last_app
    _last_app = weakref.ref(app)
    pending = list(_pending)
    _pending.clear()
    return pending


def app_for(app: Flask | None) -> Flask | None:
    """The app a module function acts on: ``app`` if given, else the current app, else ``None``."""
    if app is not None:
        return app
    from flask import current_app, has_app_context

    if has_app_context():
        # Flask types current_app as the Flask it proxies; the proxy is what has the method
        return current_app._get_current_object()  # type: ignore[attr-defined, no-any-return]
    return None


def declare(app: Flask | None, declaration: Callable[[Flask], T]) -> T | None:
    """Apply ``declaration`` to :func:`app_for` ``(app)``, else to the app initialised last in
    this process, else keep it for the next app initialised (a module-level declaration in an
    app factory's module): a declaration is never lost, nor an error for want of an app context.
    Returns its result, or ``None`` when kept."""
    target = app_for(app) or (_last_app() if _last_app is not None else None)
    if target is None:
        _pending.append(declaration)
        return None
    return declaration(target)


def with_context(fn: Callable[..., T], context: Callable[[], Any]) -> Callable[[], T]:
    """``fn`` as a no-argument callable: one that takes a required positional argument is given
    ``context()`` (the daemon context, the job fire), so ``def counter(ctx)`` and ``def tick()``
    both work."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    wants = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                for p in parameters)
    if not wants:
        return fn

    @functools.wraps(fn)
    def call() -> T:
        return fn(context())

    return call


def get_state(app: Flask | None = None) -> ImmutantState:
    """The state of ``app`` (default: the current app)."""
    if app is None:
        app = app_for(None)
        if app is None:
            raise NoAppError("working outside of application context: pass app=..., or call this inside one (a view, "
                             "a listener, a daemon, a job, or `with app.app_context():`)")
    try:
        state: ImmutantState = app.extensions[EXTENSION_KEY]
        return state
    except KeyError:
        raise NoAppError("this app has no ImmutantExtension: add ImmutantExtension(app)") from None
