"""``ImmutantExtension`` and the per-app state it keeps in ``app.extensions["immutant"]``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from . import plugins
from .errors import ImmutantConfigError
from .keys import Keys
from .settings import CORE_SETTINGS, Settings, import_paths, resolve, table

if TYPE_CHECKING:
    import redis
    from flask import Flask

    from .cluster import Member
    from .server.runtime import AppRuntime

T = TypeVar("T")

EXTENSION_KEY = "immutant"
#: Set by a node for the runtime of a deployment: JSON ``{name, context_path, settings, config}``.
#: Its ``IMMUTANT_*`` settings override the app's config (``flask immutant deploy --set``).
DEPLOYMENT_ENV = "_IMMUTANT_DEPLOYMENT"


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
        self.runtime: AppRuntime | None = None
        #: Per-app objects of feature plugins (their registries), by feature name.
        self.features: dict[str, Any] = {}

    @classmethod
    def build(
        cls,
        config: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ImmutantState:
        """Load plugins, collect their settings rows, resolve and validate every value once."""
        environ = os.environ if environ is None else environ
        pm = plugins.make_plugin_manager(_extra_plugins(config or {}, environ, overrides or {}))
        rows = list(CORE_SETTINGS)
        for contributed in pm.hook.immutant_settings():
            rows.extend(contributed or ())
        settings = resolve(table(rows), config, environ, overrides)
        plugins.apply_flags(pm, settings)
        return cls(settings, pm)

    @cached_property
    def store(self) -> redis.Redis:
        """The cluster store client; starts the embedded store if this machine has none yet."""
        from .store import client_from_url, store_url

        return client_from_url(store_url(self.settings, start=True))

    @cached_property
    def node_name(self) -> str:
        """This process's node name (set by the node for its app runtimes, else the default)."""
        from .cluster.identity import NodeIdentity

        return NodeIdentity.from_settings(self.settings).name

    def feature(self, name: str, factory: Callable[[ImmutantState], T]) -> T:
        """The per-app object of feature ``name`` (a registry, a manager), made on first use."""
        found = self.features.get(name)
        if found is None:
            found = self.features[name] = factory(self)
        return found  # type: ignore[no-any-return]

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


class ImmutantExtension:
    """Flask extension: ``ImmutantExtension(app)`` or ``ext = ImmutantExtension(); ext.init_app(app)``.

    Keeps no reference to any app; per-app state lives in ``app.extensions["immutant"]``.
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("ImmutantExtension is already initialised on this app")
        deployment = json.loads(os.environ.get(DEPLOYMENT_ENV) or "{}")
        state = ImmutantState.build(app.config, overrides=deployment.get("settings"))
        app.config.update(state.settings)
        app.extensions[EXTENSION_KEY] = state
        state.pm.hook.immutant_init_app(app=app, state=state)


def get_state(app: Flask | None = None) -> ImmutantState:
    """The state of ``app`` (default: the current app)."""
    if app is None:
        from flask import current_app

        app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]
    except KeyError:
        raise RuntimeError("this app has no ImmutantExtension: add ImmutantExtension(app)") from None
