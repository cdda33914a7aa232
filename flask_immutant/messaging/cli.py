"""``flask immutant queues`` and ``flask immutant queues requeue-dead NAME``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..cli import echoed_as_json_or_empty, load_state, one_line_errors
from ..cli_table import echo_table
from ..errors import ImmutantError
from ..records import check_types, from_json, hash_of, json_object, read_records, required
from .status import queue_entries

if TYPE_CHECKING:
    from .core import Messaging


def _messaging(ctx: click.Context) -> Messaging:
    from .core import messaging_of  # here: listing queues never imports Dramatiq

    state, _app, _path = load_state(ctx)
    return messaging_of(state)


@click.group("queues", invoke_without_command=True,
             help="Show each queue and topic subscription: depth, in flight, delayed, dead.")
@click.option("--json", "as_json", is_flag=True, help="Print the 'queues' status section as JSON.")
@click.pass_context
@one_line_errors
def queues(ctx: click.Context, as_json: bool) -> None:
    if ctx.invoked_subcommand is not None:
        return
    messaging = _messaging(ctx)
    entries = queue_entries(messaging.backend, messaging.state.store, messaging.state.keys)
    if echoed_as_json_or_empty(entries, as_json, "no destinations yet"):
        return
    lines: list[list[Any]] = []
    for entry in entries:
        rows = [entry] if entry["kind"] == "queue" else entry["subscriptions"]
        for row in rows:
            label = entry["name"]
            if entry["kind"] == "topic":
                label += f" [{row['durable_name'] or 'subscriber'}]"
            lines.append([label, _n(row["depth"]), _n(row["in_flight"]), _n(row["delayed"]), _n(row["dead"]),
                          entry["consumers"]])
        if entry["kind"] == "topic" and not rows:
            lines.append([f"{entry['name']} (no subscriptions)", None, None, None, None, entry["consumers"]])
    echo_table(("DESTINATION", "DEPTH", "IN FLIGHT", "DELAYED", "DEAD", "CONSUMERS"), lines,
               right={"DEPTH", "IN FLIGHT", "DELAYED", "DEAD", "CONSUMERS"})


def _n(value: Any) -> str:
    return "?" if value is None else str(value)


@queues.command("requeue-dead", help="Move the dead messages of a queue (or topic subscription) back onto it.")
@click.argument("name")
@click.pass_context
@one_line_errors
def requeue_dead(ctx: click.Context, name: str) -> None:
    messaging = _messaging(ctx)
    moved, kept = requeue_dead_messages(messaging, name)
    click.echo(f"requeued {moved} dead message(s) of {name}"
               + (f"; kept {kept} undecodable one(s) (see `queues --json`)" if kept else ""))


def requeue_dead_messages(messaging: Messaging, name: str) -> tuple[int, int]:
    """Publish each dead message of ``name`` again, then drop its dead record (at-least-once);
    returns (requeued, kept). Records of undecodable bytes have nothing to publish and are kept.

    The copy gets a new message id: should it die again at once, its new record is not the one
    deleted here."""
    from dramatiq import Message as DramatiqMessage

    from . import backends

    store, keys = messaging.state.store, messaging.state.keys
    queues = _queues_named(messaging, name)
    moved = kept = 0
    for queue in queues:
        dead_key = keys.messaging_dead(queue)
        dead = hash_of(store, dead_key, "dead letter")
        republishable = read_records(dead, f"{queue} dead letter", _dead_message)
        kept += len(dead) - len(republishable)
        for message_id, original in republishable.items():
            message: DramatiqMessage[Any] = DramatiqMessage(queue_name=queue, actor_name=original["actor_name"],
                                      args=tuple(original["args"]), kwargs=original.get("kwargs") or {},
                                      options={}, message_timestamp=original["message_timestamp"])
            messaging.backend.publish(messaging.publisher, [backends.Target(message)], None)
            store.hdel(dead_key, message_id)
            moved += 1
    return moved, kept


#: What a dead record's ``message`` needs to be published again.
_REPUBLISHABLE = {"actor_name", "args", "message_timestamp"}


def _json_field(raw: Any, name: str) -> Any:
    try:
        data = from_json(raw)
    except (TypeError, ValueError):
        return None
    return data.get(name) if isinstance(data, dict) else None


def _dead_message(message_id: str, raw: Any) -> dict[str, Any]:
    """The original message of a dead-letter record (a malformed one stays where it is, named)."""
    original: dict[str, Any] = json_object(message_id, raw)["message"]
    required(original, {"actor_name": str, "args": list, "message_timestamp": int})
    check_types(original, {"kwargs": (dict, type(None))})
    return original


def _queues_named(messaging: Messaging, name: str) -> list[str]:
    store, keys = messaging.state.store, messaging.state.keys
    raw = store.hget(keys.messaging_destinations, name)
    if raw is not None:
        record = from_json(raw)
        if record.get("kind") == "queue":
            return [record["queue"]]
        subs = [q.decode() if isinstance(q, bytes) else q for q in store.hkeys(keys.messaging_subscriptions(name))]
        return subs
    if store.exists(keys.messaging_dead(name)):
        return [name]  # a Dramatiq queue name, as shown by `queues --json`
    known = sorted(k.decode() if isinstance(k, bytes) else k for k in store.hkeys(keys.messaging_destinations))
    raise ImmutantError(f"no destination named {name!r}; known: {', '.join(known) or 'none'}")
