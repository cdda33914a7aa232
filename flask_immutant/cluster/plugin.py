"""Built-in plugin: ``flask immutant status`` and the ``members`` status section."""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import click
import redis

from ..cli import load_state, one_line_errors
from ..cli_table import echo_table, printable
from ..hookspecs import hookimpl
from ..loops import read_health, report_health, stop_reporting
from .membership import live_members

if TYPE_CHECKING:
    from ..protocols import RuntimeView


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(status)


@hookimpl(trylast=True)
def immutant_node_started(node: Any) -> None:
    report_health(node.store, node.state.keys, node.identity.name, "node", node.settings["IMMUTANT_FAILURE_TIMEOUT"])


@hookimpl(trylast=True)
def immutant_node_stopping(node: Any) -> None:
    stop_reporting()


@hookimpl(trylast=True)
def immutant_runtime_started(runtime: RuntimeView) -> None:
    state = runtime.state
    report_health(state.store, state.keys, state.node_name, f"runtime:{runtime.app.name}",
                  state.settings["IMMUTANT_FAILURE_TIMEOUT"])


@hookimpl(wrapper=True, trylast=True)
def immutant_runtime_stopping(runtime: RuntimeView) -> Generator[None, Any, Any]:
    """Around the features' implementations: once they have stopped, close the leases they used."""
    from .lease import LEASES

    try:
        return (yield)
    finally:
        manager = runtime.state.pop(LEASES)
        if manager is not None:
            manager.close()
        stop_reporting()


@hookimpl(trylast=True)
def immutant_status(state: Any, store: redis.Redis) -> dict[str, Any]:
    """``members`` (each with ``healthy`` and ``failing_loops``) and ``loops``: every process's loops."""
    members = live_members(store, state.keys, state.settings["IMMUTANT_FAILURE_TIMEOUT"])
    processes = read_health(store, state.keys)
    loops = [{**health, "node": p["node"], "role": p["role"], "pid": p["pid"]}
             for p in processes for health in p["loops"] if isinstance(health, dict)]
    rows = []
    for member in members:
        failing = sorted({f"{loop.get('role')}/{loop.get('name')}" for loop in loops
                          if loop["node"] == member.name and loop.get("healthy") is not True})
        rows.append({**member.status(), "healthy": not failing, "failing_loops": failing})
    return {"members": rows, "loops": loops}


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
    echo_table(("NAME", "ADDRESS", "PID", "UP SINCE", "LAST HEARTBEAT", "NOTE"),
               ([m["name"], f"{m['address']}:{m['ports'].get('http')}", m["pid"], m["up_since"], m["last_heartbeat"],
                 _note(m)] for m in members), right={"PID"}, indent="  ")
    loops = document["loops"]
    failing = [loop for loop in loops if not loop["healthy"]]
    click.echo(f"loops: {len(loops)}, " + (f"{len(failing)} FAILING" if failing else "all healthy"))
    if failing:
        echo_table(("NODE", "ROLE", "LOOP", "STATE", "FAILURES IN A ROW", "LAST ERROR"),
                   ([loop["node"], loop["role"], loop["name"], loop["state"], loop["consecutive_failures"],
                     loop["last_error"]] for loop in failing), right={"FAILURES IN A ROW"}, indent="  ")
    for name, section in document.items():
        if name in {"schema", "cluster", "members", "store", "loops", "warnings"}:
            continue
        if isinstance(section, list):
            names = ", ".join(str(item.get("name", item.get("node", "?"))) for item in section[:8]
                              if isinstance(item, dict))
            more = f", +{len(section) - 8} more" if len(section) > 8 else ""
            click.echo(printable(f"{name}: {len(section)}" + (f" ({names}{more})" if names else "")))
        else:
            click.echo(f"{name}: {json.dumps(section, sort_keys=True)}")
    click.echo("(details: --json, or each feature's own command)")


def _note(member: dict[str, Any]) -> str:
    """What is wrong with a member, for the status table (empty: nothing)."""
    notes = [] if member["clustered"] else ["not clustered"]
    if not member["healthy"]:
        notes.append(f"UNHEALTHY: {', '.join(member['failing_loops'])} failing")
    return "; ".join(notes)
