"""Built-in plugin: daemons start with the app runtime; ``flask immutant daemons``; status."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

from ..cli import echoed_as_json_or_empty, one_line_errors, state_and_store
from ..cli_table import echo_table
from ..hookspecs import hookimpl
from ..records import decoded, hash_of, json_object, read_records, required
from ..settings import Setting, to_bool

if TYPE_CHECKING:
    import redis

    from ..protocols import RuntimeView
    from ..state import ImmutantState

FLAG = "IMMUTANT_DAEMONS"


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [Setting(FLAG, True, to_bool, "Run the daemons apps declare with flask_immutant.daemons.", "bool")]


@hookimpl(trylast=True)
def immutant_runtime_started(runtime: RuntimeView) -> None:
    from .registry import registry  # here: loading the plugin (every command does) stays light

    registry(runtime.app).activate_all()


@hookimpl(trylast=True)
def immutant_runtime_stopping(runtime: RuntimeView) -> None:
    from .registry import registry

    registry(runtime.app).shutdown()


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(daemons)


@hookimpl(trylast=True)
def immutant_status(state: ImmutantState, store: redis.Redis) -> dict[str, Any]:
    return {"daemons": daemon_status(state, store)}


def daemon_status(state: ImmutantState, store: redis.Redis) -> list[dict[str, Any]]:
    """One entry per daemon (per node for non-singletons); holders come from the leases."""
    from ..cluster.membership import live_members

    records = read_records(hash_of(store, state.keys.daemons, "daemon"), "daemon", _daemon_record).values()
    live: set[str] = set()  # which nodes run: asked only for per-node daemons (a singleton's holder is its lease's)
    if any(not record["singleton"] for record in records):
        live = {m.name for m in live_members(store, state.keys, state.settings["IMMUTANT_FAILURE_TIMEOUT"])}
    result = []
    for record in sorted(records, key=lambda r: (r["name"], r["node"] or "")):
        entry = {
            "name": record["name"], "singleton": record["singleton"], "state": record["state"],
            "node": record["node"], "since": record["since"], "fencing_token": record["fencing_token"],
            "restarts": record["restarts"], "last_error": record["last_error"],
        }
        if record["singleton"]:
            holder = _singleton_holder(store, state, record["name"])
            entry.update(node=holder.node if holder else None, fencing_token=holder.fence if holder else None,
                         since=holder.since if holder else None, state="running" if holder else "waiting")
            if holder is None or record["fencing_token"] != holder.fence:
                entry.update(restarts=0, last_error=None)  # the record is an earlier holder's
        elif record["node"] not in live:
            continue
        result.append(entry)
    return result


_OPTIONAL_STR = (str, type(None))
#: The fields of a daemon record (``runner.py`` writes them) and their JSON types.
DAEMON_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "singleton": bool, "state": str, "node": _OPTIONAL_STR, "since": (float, type(None)),
    "fencing_token": (int, type(None)), "restarts": int, "last_error": _OPTIONAL_STR,
}


def _daemon_record(_name: str, raw: Any) -> dict[str, Any]:
    record = json_object(_name, raw)
    required(record, DAEMON_FIELDS)
    return record


def _singleton_holder(store: Any, state: ImmutantState, name: str) -> Any:
    from ..cluster.lease import read_holder

    holder = read_holder(store, state.keys, f"daemon:{name}")
    if holder is None:  # standalone nodes hold per-node leases; show any
        for key in store.scan_iter(match=state.keys.lease(f"daemon:{name}@*"), count=100):
            key = decoded(key)
            if key is None:
                continue
            found = read_holder(store, state.keys, key[len(state.keys.lease("")):])
            if found:
                return found
    return holder


@click.command(help="Show each daemon: singleton or not, holder node, since when, fencing token, restarts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@one_line_errors
def daemons(ctx: click.Context, as_json: bool) -> None:
    with state_and_store(ctx) as (state, store):
        entries = daemon_status(state, store)
    if echoed_as_json_or_empty(entries, as_json, "no daemons"):
        return
    echo_table(("DAEMON", "KIND", "STATE", "NODE", "SINCE", "TOKEN", "RESTARTS"),
               ([e["name"], "singleton" if e["singleton"] else "per-node", e["state"], e["node"],
                 time.strftime("%H:%M:%S", time.localtime(e["since"])) if e["since"] else None,
                 e["fencing_token"], e["restarts"]] for e in entries), right={"TOKEN", "RESTARTS"})
