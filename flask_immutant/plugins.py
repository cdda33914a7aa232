"""The plugin manager: built-in features, entry-point plugins and ``IMMUTANT_PLUGINS``.

One manager per app (kept in ``app.extensions["immutant"]``) or per CLI invocation; never a
module-level one, so two apps in one process can load different plugins.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import FunctionType, ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import ImmutantConfigError

#: Built-in features, registered exactly like third-party plugins. Each may own a flag setting
#: named in its ``FLAG`` attribute; a plugin whose flag is off is unregistered after resolution.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "flask_immutant.store.plugin",
    "flask_immutant.cluster.plugin",
    "flask_immutant.server.plugin",
    "flask_immutant.caching.plugin",
    "flask_immutant.web.plugin",
    "flask_immutant.daemons.plugin",
    "flask_immutant.jobs.plugin",
    "flask_immutant.deploy.plugin",
    "flask_immutant.contexts.plugin",
    "flask_immutant.messaging.plugin",
    "flask_immutant.balancer.console_plugin",
    "flask_immutant.balancer.balancer_plugin",
    "flask_immutant.events.plugin",
    "flask_immutant.config_command",
    "flask_immutant.metrics.plugin",
    "flask_immutant.tracing.plugin",
    "flask_immutant.logs",
)

#: The setuptools entry-point group third-party plugins register under.
ENTRY_POINT_GROUP = hookspecs.PROJECT


def load(path: str) -> Any:
    """Import a plugin given as ``package.module`` or ``package.module:attribute``."""
    module_name, _, attribute = path.partition(":")
    try:
        module: ModuleType = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImmutantConfigError(f"IMMUTANT_PLUGINS: cannot import plugin {path!r}: {exc}") from None
    if not attribute:
        return module
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImmutantConfigError(f"IMMUTANT_PLUGINS: {module_name!r} has no attribute {attribute!r}") from None


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, registering a module faster: a plugin module's names are mostly what it
    imported (modules, classes, constants), and pluggy looks at each with ``inspect.getattr_static``
    (about 4 ms for the built-ins, paid by every command). A module's own dictionary tells the same
    without that for what can never be a hook: a module, a class, a value that cannot be called,
    or a plain function without our marker. Anything else (other plugin objects, decorated or
    wrapped functions, names a module's ``__getattr__`` serves) goes to pluggy, whichever version."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> pluggy.HookimplOpts | None:
        if type(plugin) is ModuleType:
            namespace = vars(plugin)
            if name in namespace:
                value = namespace[name]
                if issubclass(type(value), (ModuleType, type)) or not callable(value):  # type(): a proxy's own
                    return None
                if type(value) is FunctionType and not hasattr(value, f"{self.project_name}_impl"):
                    return None
        return super().parse_hookimpl_opts(plugin, name)


def make_plugin_manager(extra: Iterable[str] = (), *, entry_points: bool = True) -> pluggy.PluginManager:
    """A manager with the built-ins, the entry-point plugins and the ``extra`` import paths.

    ``check_pending`` runs last, so a plugin with a misspelled ``@hookimpl`` fails here, at start.
    """
    pm = PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    try:
        for path in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(path), name=path)
        try:
            if entry_points:
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except ImportError as exc:
            raise ImmutantConfigError(
                f"an installed plugin (entry point group {ENTRY_POINT_GROUP!r}) cannot be imported: {exc}"
            ) from None
        for path in extra:
            if pm.has_plugin(path):
                continue
            pm.register(load(path), name=path)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        # Wrong hook name (check_pending) or an argument the hook does not pass (register).
        detail = " ".join(str(exc).split())
        raise ImmutantConfigError(f"plugin {exc.plugin!r} does not match flask-immutant's hooks: {detail}") from None
    return pm


def apply_flags(pm: pluggy.PluginManager, settings: Any) -> None:
    """Unregister plugins whose ``FLAG`` setting is off (their settings rows stay known)."""
    for plugin in list(pm.get_plugins()):
        flag = getattr(plugin, "FLAG", None)
        if flag and not settings.get(flag, True):
            pm.unregister(plugin)


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the registered plugins, for status and debugging."""
    return sorted(name for name, _plugin in pm.list_name_plugin() if name)
