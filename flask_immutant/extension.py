"""``ImmutantExtension``, the handle: declarations recorded and applied in ``init_app``, actions on
the current app. The per-app state it builds lives in :mod:`flask_immutant.state` (re-exported
here for older imports)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .state import (
    EXTENSION_KEY,
    FEATURE_FLAGS,
    Declaration,
    ImmutantState,
    app_for,
    declare,
    get_state,
    initialised,
    require_feature,
    switched_off,
    with_context,
)

if TYPE_CHECKING:
    from flask import Flask

    from .server.environ import DEPLOYMENT_ENV
    from .server.environ import DeploymentEnviron as DeploymentEnviron  # re-exported

__all__ = ["DEPLOYMENT_ENV", "EXTENSION_KEY", "FEATURE_FLAGS", "ImmutantExtension", "ImmutantState", "app_for",
           "declare", "get_state", "require_feature", "switched_off", "with_context"]

F = TypeVar("F", bound=Callable[..., Any])


def __getattr__(name: str) -> Any:
    """``DEPLOYMENT_ENV`` and ``DeploymentEnviron`` (re-exported) are imported on first use: the
    CLI group imports this module for every command, and only ``init_app`` reads the deployment."""
    if name in ("DEPLOYMENT_ENV", "DeploymentEnviron"):
        from .server import environ

        return getattr(environ, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "DEPLOYMENT_ENV", "DeploymentEnviron"]


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
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("ImmutantExtension is already initialised on this app")
        from .server.environ import DeploymentEnviron

        deployment = DeploymentEnviron.current()
        state = ImmutantState.build(app.config, overrides=deployment.settings)
        app.config.update(state.settings)
        state.app_id = state.settings["IMMUTANT_APP_ID"] or deployment.name or app.name
        app.extensions[EXTENSION_KEY] = state
        state.pm.hook.immutant_init_app(app=app, state=state)
        self._apps.add(app)
        pending = initialised(app)
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
