"""``ImmutantExtension`` and the per-app state it keeps in ``app.extensions["immutant"]``."""

from __future__ import annotations

import functools
import inspect
import json
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from . import plugins
from .errors import ImmutantConfigError, NoAppError
from .keys import Keys
from .settings import CORE_SETTINGS, Settings, import_paths, resolve, table

if TYPE_CHECKING:
    import redis
    from flask import Flask

    from .cluster import Member
    from .server.runtime import AppRuntime

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

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
    ) -> ImmutantState:
        """Load plugins, collect their settings rows, resolve and validate every value once."""
        environ = os.environ if environ is None else environ
        pm = plugins.make_plugin_manager(_extra_plugins(config or {}, environ, overrides or {}))
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
        found: T | None = self.features.get(name)
        if found is None:
            found = self.features[name] = factory(self)
        return found

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


class ImmutantExtension:
    """The flask-immutant handle: ``immutant = ImmutantExtension()`` at import, declarations with
    its decorators, ``immutant.init_app(app)`` in the app factory (or ``ImmutantExtension(app)``).

    Declarations are recorded here and applied to every app this extension is initialised on, as
    blueprints are; the extension keeps no app (only weak references, to apply declarations
    made after ``init_app``), so one extension serves several apps. Per-app state lives in
    ``app.extensions["immutant"]``. Actions (:meth:`publish`, :meth:`cache`, :meth:`current`...)
    act on ``flask.current_app``: in views, listeners, daemons and jobs.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._declarations: list[Declaration] = []
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        global _last_app
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("ImmutantExtension is already initialised on this app")
        deployment = json.loads(os.environ.get(DEPLOYMENT_ENV) or "{}")
        state = ImmutantState.build(app.config, overrides=deployment.get("settings"))
        app.config.update(state.settings)
        state.app_id = state.settings["IMMUTANT_APP_ID"] or deployment.get("name") or app.name
        app.extensions[EXTENSION_KEY] = state
        state.pm.hook.immutant_init_app(app=app, state=state)
        self._apps.add(app)
        _last_app = weakref.ref(app)
        pending = list(_pending)
        _pending.clear()
        for declaration in (*pending, *self._declarations):
            declaration(app)

    # --- declaring (recorded, applied to each app) ---

    def record(self, declaration: Declaration) -> None:
        """Apply ``declaration(app)`` to every app this extension serves, now and later."""
        self._declarations.append(declaration)
        for app in list(self._apps):
            declaration(app)

    def declare(self, name: str, *, kind: str | None = None) -> None:
        """Declare the messaging destination ``name`` (``/queue/...``, ``/topic/...``, or ``kind=``)."""
        from . import messaging

        self.record(lambda app: messaging.declare(name, kind=kind, app=app))

    def listen(self, name: str, *, concurrency: int | None = None, selector: Any = None,
               durable_name: str | None = None) -> Callable[[F], F]:
        """Decorator: call the function with each message's body on ``name`` (declared if it is
        not), in the app context, once the app runtime has started."""
        from . import messaging

        def register(fn: F) -> F:
            self.record(lambda app: messaging.listen(name, fn, app=app, concurrency=concurrency,
                                                     selector=selector, durable_name=durable_name))
            return fn

        return register

    def respond(self, name: str, **options: Any) -> Callable[[F], F]:
        """Decorator: answer requests on ``name`` with the function's return value."""
        from . import messaging

        def register(fn: F) -> F:
            self.record(lambda app: messaging.respond(name, fn, app=app, **options))
            return fn

        return register

    def daemon(self, name: str, *, singleton: bool = True, stop: Callable[[], Any] | None = None
               ) -> Callable[[F], F]:
        """Decorator: run the function as daemon ``name`` (on one node of the cluster, with
        failover, unless ``singleton=False``). It receives the daemon's context: loop on
        ``while not ctx.wait(seconds)``; ``stop`` is called when it must stop."""
        from . import daemons

        def register(fn: F) -> F:
            self.record(lambda app: daemons.declare(name, fn, stop, singleton=singleton, app=app))
            return fn

        return register

    def job(self, name: str, **schedule: Any) -> Callable[[F], F]:
        """Decorator: run the function on a schedule (``cron=``, ``every=``, ``at=``, ``in_=``,
        ``until=``, ``limit=``, ``singleton=``, ``misfire=``: see ``jobs.schedule``). It receives
        the :class:`~flask_immutant.jobs.Fire` it runs for, if it takes an argument."""
        from . import jobs
        from .jobs.spec import JobSpec

        JobSpec.build(name, **schedule)  # a schedule that cannot be fails here, at import

        def register(fn: F) -> F:
            self.record(lambda app: jobs.schedule(name, fn, app=app, **schedule))
            return fn

        return register

    # --- acting (on the current app) ---

    def publish(self, name: str, message: Any, **options: Any) -> str | None:
        """Publish ``message`` to a queue or topic of the current app (``messaging.publish``)."""
        from . import messaging

        return messaging.publish(name, message, **options)

    def publish_many(self, name: str, messages: Iterable[Any], **options: Any) -> list[str | None]:
        """Publish several messages to a queue or topic of the current app in one round trip to
        the broker (``messaging.publish_many``); their ids in order."""
        from . import messaging

        return messaging.publish_many(name, messages, **options)

    def request(self, name: str, message: Any, **options: Any) -> Any:
        """Send a request; ``.result()`` on the returned response waits for the answer."""
        from . import messaging

        return messaging.request(name, message, **options)

    def cache(self, name: str, **options: Any) -> Any:
        """The current app's cluster cache ``name`` (``caching.cache``)."""
        from . import caching

        return caching.cache(name, **options)

    def schedule(self, name: str, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Schedule a job on the current app now (``jobs.schedule``, which says where it goes
        outside an app context); a decorator without ``fn``."""
        from . import jobs

        return jobs.schedule(name, fn, **options)

    def current(self) -> Any:
        """What this thread is running for: the message, daemon context or job fire, or ``None``."""
        from .running import current

        return current()

    def state(self, app: Flask | None = None) -> ImmutantState:
        """The state of ``app`` (default: the current app)."""
        return get_state(app)


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
