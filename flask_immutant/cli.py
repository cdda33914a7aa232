"""``flask immutant ...``: the command group and what every subcommand shares.

Subcommands belong to the feature that owns them and arrive through the
``immutant_register_commands`` hook (``run`` from ``server``, ``status`` from ``cluster``,
``store`` from ``store``, third-party ones from entry points). Commands work with or without an
app: with one, its ``app.config`` is read; without, the environment and defaults are used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click
import pluggy
from flask import Flask
from flask.cli import AppGroup, NoAppException, ScriptInfo

from .cli_table import printable
from .errors import ImmutantConfigError, ImmutantError
from .logs import setup_logging as setup_logging  # where the commands that start processes find it
from .plugins import ENTRY_POINT_GROUP, make_plugin_manager
from .settings import float_range, import_paths
from .state import EXTENSION_KEY, ImmutantState

if TYPE_CHECKING:
    import redis

F = TypeVar("F", bound=Callable[..., Any])


#: Where the group leaves the plugin manager it registered the commands with, for the command's
#: state (:func:`load_state`): one manager per invocation, not one more for the state.
COMMANDS_MANAGER = "flask_immutant.commands_manager"


class ImmutantGroup(AppGroup):
    """An ``AppGroup`` whose subcommands come from plugins, registered on first use."""

    _registered = False

    def _register(self, ctx: click.Context | None = None) -> None:
        if self._registered:
            return
        self._registered = True
        try:
            extra = import_paths(os.environ.get("IMMUTANT_PLUGINS", ""))
            pm = make_plugin_manager(extra)
        except (ImmutantConfigError, ValueError) as exc:
            click.echo(f"Warning: only built-in commands are available: {exc}", err=True)
            pm = make_plugin_manager(entry_points=False)
        else:
            if ctx is not None:
                ctx.meta[COMMANDS_MANAGER] = (extra, tuple(sys.path), pm)
        pm.hook.immutant_register_commands(cli=self)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Arguments become store keys, folder names and balancer commands: one that is not text
        (bytes the locale cannot decode, which Python keeps as lone surrogates) is one usage error."""
        for arg in args:
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                raise click.UsageError(f"argument {arg!r} is not valid UTF-8 text", ctx) from None
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._register(ctx)
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._register(ctx)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        """Our commands start without full collections, and their process exits without scanning
        its heap (``startup.py``); the ones that keep running say when they have started."""
        from . import startup

        startup.starting()
        startup.freeze_at_exit()
        try:
            return super().invoke(ctx)
        finally:
            startup.finished()


cli = ImmutantGroup("immutant", help="Run and inspect flask-immutant cluster nodes.")


def one_line_errors(func: F) -> F:
    """Report a user's mistake as one ``Error:`` line and exit 1, never a traceback; and the
    records a listing skipped as malformed as ``Warning:`` lines on stderr (``records.py``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .records import collecting

        try:
            with collecting() as warnings:
                try:
                    return func(*args, **kwargs)
                finally:
                    for warning in warnings:
                        click.echo(f"Warning: {printable(str(warning))}", err=True)
        except ImmutantError as exc:  # its text may name what the store holds: printable
            raise click.ClickException(printable(str(exc))) from None
        except NoAppException as exc:
            raise click.ClickException(printable(str(exc).splitlines()[0])) from None
        except Exception as exc:
            if not _is_store_error(exc):
                raise
            raise click.ClickException(printable(f"the cluster store did not answer: {exc}")) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps func's signature; mypy cannot see it


def _is_store_error(exc: BaseException) -> bool:
    """A redis-py error, without importing redis: a command that never loaded it cannot raise one
    (so ``flask --help`` and other apps' commands do not pay for importing it)."""
    loaded = sys.modules.get("redis")
    return loaded is not None and isinstance(exc, loaded.RedisError)


def checked_option(kind: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback checking an option with a :mod:`.names` rule: ``Error: Invalid value for
    '--name': ...`` on one line, as for any other bad option."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return kind(value)
        except ValueError as exc:
            raise click.BadParameter(f"{value!r}: expected {exc}") from None

    return callback


#: ``--wait SECONDS`` of the commands that wait for the nodes: finite, not negative (never nan).
WAIT_SECONDS = checked_option(float_range(0, 86400))
#: A TCP port to listen on (0: any free one).
LISTEN_PORT = click.IntRange(0, 65535)


def find_app(ctx: click.Context) -> tuple[Flask | None, str | None]:
    """The app ``flask`` would load, or ``(None, None)`` when none was named or found.

    An app named with ``--app``/``FLASK_APP`` that fails to load is an error; one merely not found
    in the current folder is not: ``run`` then waits for deployments.
    """
    info = ctx.ensure_object(ScriptInfo)
    named = info.app_import_path or os.environ.get("FLASK_APP")
    try:
        app = info.load_app()
    except NoAppException:
        if named or any(os.path.exists(name) for name in ("wsgi.py", "app.py")):
            raise  # an app is here but does not import: say why, do not pretend there is none
        return None, None
    except Exception as exc:  # the app's own module raised while importing
        raise ImmutantError(f"app {named or '(found here)'} failed to load: {type(exc).__name__}: {exc}") from exc
    return app, info.app_import_path


def load_state(
    ctx: click.Context, overrides: Mapping[str, Any] | None = None
) -> tuple[ImmutantState, Flask | None, str | None]:
    """Resolve settings for a command: the app's config if there is an app, the environment,
    then the command's options (``overrides``; ``None`` values mean "not given")."""
    app, import_path = find_app(ctx)
    config: Mapping[str, Any] = {}
    if app is not None:
        config = {k: v for k, v in app.config.items() if k.startswith("IMMUTANT_")}
        if EXTENSION_KEY in app.extensions and not any(v is not None for v in (overrides or {}).values()):
            return app.extensions[EXTENSION_KEY], app, import_path
    state = ImmutantState.build(config, overrides=overrides, make_pm=functools.partial(_plugin_manager, ctx))
    return state, app, import_path


def _plugin_manager(ctx: click.Context, extra: tuple[str, ...]) -> pluggy.PluginManager:
    """The manager the group registered the commands with when it loaded the same plugins from the
    same ``sys.path`` (taken once: the state unregisters the plugins whose flag is off), else a
    new one. Loading the app may put its folder on the path, with entry-point plugins beside it."""
    registered = ctx.meta.pop(COMMANDS_MANAGER, None)
    if registered is not None and registered[0] == extra and not _path_added_plugins(registered[1]):
        return cast("pluggy.PluginManager", registered[2])
    return make_plugin_manager(extra)


def _path_added_plugins(before: tuple[str, ...]) -> bool:
    """Whether ``sys.path`` differs from ``before`` by more than folders put in front of it holding
    no installed plugin. Flask puts the app's folder there (``flask`` the script does whenever an
    app is looked for: its ``sys.path`` starts with the script's folder, not the current one), and
    that folder seldom holds a distribution with entry points in our group."""
    added = len(sys.path) - len(before)
    if added < 0 or tuple(sys.path[added:]) != before:
        return True
    return added > 0 and any(entry.group == ENTRY_POINT_GROUP for dist in metadata.distributions(path=sys.path[:added])
                             for entry in dist.entry_points)


@contextlib.contextmanager
def state_and_store(ctx: click.Context) -> Iterator[tuple[ImmutantState, redis.Redis]]:
    """For a command that reads the cluster: its settings and a store client, closed afterwards.
    It never starts the embedded store (a command must not leave a server behind)."""
    from .store import existing_store

    state, _app, _path = load_state(ctx)
    with existing_store(state.settings) as store:
        yield state, store


def echoed_as_json_or_empty(data: Any, as_json: bool, empty: str) -> bool:
    """The shared start of a listing command: print ``data`` as JSON (``--json``) or ``empty``
    when there is nothing; True when that was all there was to print."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return True
    if not data:
        click.echo(empty)
        return True
    return False


