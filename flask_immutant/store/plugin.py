"""Built-in plugin: ``flask immutant store status|stop`` and the ``store`` status section."""

from __future__ import annotations

import json
from typing import Any

import click

from ..cli import load_state, one_line_errors
from ..errors import ImmutantError
from ..hookspecs import hookimpl
from .connect import describe_url
from .embedded import EmbeddedStore


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(store)


@hookimpl(trylast=True)
def immutant_status(state: Any) -> dict[str, Any]:
    url = state.settings["IMMUTANT_REDIS_URL"]
    if url:
        return {"store": {"embedded": False, "url": describe_url(url)}}
    return {"store": {"embedded": True, "url": EmbeddedStore(state.settings["IMMUTANT_HOME"]).url}}


@click.group(help="Inspect or stop this machine's embedded cluster store.")
def store() -> None:
    pass


@store.command("status", help="Show the embedded store: socket, pid, version, memory, keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@one_line_errors
def store_status(ctx: click.Context, as_json: bool) -> None:
    state, _app, _path = load_state(ctx)
    url = state.settings["IMMUTANT_REDIS_URL"]
    if url:
        info: dict[str, Any] = {"embedded": False, "url": describe_url(url)}
    else:
        info = EmbeddedStore(state.settings["IMMUTANT_HOME"]).status()
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    if not info["embedded"]:
        click.echo(f"store: {info['url']} (external, IMMUTANT_REDIS_URL; not managed by flask-immutant)")
        return
    if not info["running"]:
        click.echo(f"embedded store: not running ({info['url']})")
        return
    click.echo(
        f"embedded store: running {info['server']} {info['version']} pid={info['pid']} url={info['url']} "
        f"uptime={info['uptime_seconds']}s clients={info['clients']} memory={info['used_memory']} "
        f"keys={info['keys']} aof={'on' if info['aof'] else 'off'} dir={info['dir']}"
    )



@store.command("stop", help="Shut the embedded store down (its data stays in IMMUTANT_HOME).")
@click.pass_context
@one_line_errors
def store_stop(ctx: click.Context) -> None:
    state, _app, _path = load_state(ctx)
    if state.settings["IMMUTANT_REDIS_URL"]:
        raise ImmutantError("IMMUTANT_REDIS_URL is set: that store is not flask-immutant's to stop")
    embedded = EmbeddedStore(state.settings["IMMUTANT_HOME"])
    if embedded.stop():
        click.echo(f"embedded store stopped ({embedded.url})")
    else:
        click.echo(f"embedded store was not running ({embedded.url})")

