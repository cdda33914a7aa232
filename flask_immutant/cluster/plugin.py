"""Built-in plugin: ``flask immutant status`` and the ``members`` status section."""

from __future__ import annotations

import json
from typing import Any

import click
import redis

from ..cli import load_state, one_line_errors
from ..hookspecs import hookimpl
from .membership import live_members


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(status)


@hookimpl(trylast=True)
def immutant_runtime_stopping(runtime: Any) -> None:
    """After the features (called later, being registered earlier): close the leases they used."""
    manager = runtime.state.features.pop("leases", None)
    if manager is not None:
        manager.close()


@hookimpl(trylast=True)
def immutant_status(state: Any, store: redis.Redis) -> dict[str, Any]:
    members = live_members(store, state.keys, state.settings["IMMUTANT_FAILURE_TIMEOUT"])
    return {"members": [member.status() for member in members]}


@click.command(help="Show the cluster's members (and what plugins add); --json for the schema in docs/status.md.")
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.pass_context
@one_line_errors
def status(ctx: click.Context, as_json: bool) -> None:
    state, _app, _path = load_state(ctx)
    document = state.status()
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    members = document["members"]
    click.echo(f"cluster {document['cluster']}: {len(members)} member(s), store {document['store']['url']}")
    for m in members:
        click.echo(
            f"  {m['name']:<24} {m['address']}:{m['ports'].get('http')}  pid {m['pid']}  "
            f"up since {m['up_since']}  last heartbeat {m['last_heartbeat']}"
            + ("" if m["clustered"] else "  (not clustered)")
        )
    for name, section in document.items():
        if name in {"schema", "cluster", "members", "store"}:
            continue
        if isinstance(section, list):
            names = ", ".join(str(item.get("name", item.get("node", "?"))) for item in section[:8]
                              if isinstance(item, dict))
            more = f", +{len(section) - 8} more" if len(section) > 8 else ""
            click.echo(f"{name}: {len(section)}" + (f" ({names}{more})" if names else ""))
        else:
            click.echo(f"{name}: {json.dumps(section, sort_keys=True)}")
    click.echo("(details: --json, or each feature's own command)")
