"""Built-in plugin: ``flask immutant config``, every effective ``IMMUTANT_*`` value and its source.

The values are resolved exactly as ``run`` resolves them (the settings table's one precedence
rule, :func:`flask_immutant.settings.pick`), so what it prints is what a node would use.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from .cli import find_app, one_line_errors
from .cli_table import echo_table
from .errors import ImmutantError
from .hookspecs import hookimpl
from .settings import PREFIX, pick
from .state import EXTENSION_KEY, ImmutantState

#: What each source is called in the output (``option``: this command's ``--set``).
SOURCE_NAMES = {"default": "default", "app.config": "app.config", "environment": "environment",
                "option": "command line"}
#: Settings whose whole value is hidden; URLs anywhere have only their password hidden.
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN")
MASK = "********"


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(config)


def masked(name: str, value: Any) -> Any:
    """``value`` fit to print: secrets hidden, a URL's password hidden (the rest helps debugging)."""
    if value is None:
        return None
    if any(word in name for word in SECRET_WORDS):
        return MASK
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password:
            netloc = parts.netloc.rsplit("@", 1)[1]
            user = f"{parts.username}:" if parts.username else ":"
            return urlunsplit(parts._replace(netloc=f"{user}{MASK}@{netloc}"))
    return value


def parse_sets(pairs: tuple[str, ...]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith(PREFIX):
            raise ImmutantError(f"--set {pair!r}: expected {PREFIX}KEY=VALUE")
        overrides[key] = value
    return overrides


def effective(config: dict[str, Any], overrides: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{name: {"value", "source"}}`` for every setting row, values validated and masked."""
    state = ImmutantState.build(config, overrides=overrides)
    rows = state.settings.rows
    document: dict[str, dict[str, Any]] = {}
    for name in sorted(rows):
        source, _raw = pick(rows[name], config, os.environ, overrides)
        value = state.settings[name]
        document[name] = {"value": masked(name, list(value) if isinstance(value, tuple) else value),
                          "source": SOURCE_NAMES[source]}
    return document


@click.command(help="Print every effective IMMUTANT_* setting and where it came from "
                    "(default, app.config, environment, command line).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, as a command-line option of `run` would.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {name: {value, source}}.")
@click.pass_context
@one_line_errors
def config(ctx: click.Context, sets: tuple[str, ...], as_json: bool) -> None:
    overrides = parse_sets(sets)
    app, _path = find_app(ctx)
    given: dict[str, Any] = {}
    if app is not None:
        state = app.extensions.get(EXTENSION_KEY)
        # After init_app, app.config holds every resolved value: the app's own are kept apart.
        source = state.given_config if state is not None else app.config
        given = {k: v for k, v in source.items() if k.startswith(PREFIX)}
    document = effective(given, overrides)
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=True, default=str))
        return
    echo_table(("SETTING", "VALUE", "(SOURCE)"),
               ([name, _shown(entry["value"]), f"({entry['source']})"] for name, entry in document.items()))


def _shown(value: Any) -> str:
    return "unset" if value in (None, []) else (",".join(value) if isinstance(value, list) else str(value))
