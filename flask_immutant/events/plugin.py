"""Built-in plugin: the event log's setting, its writer in each node and runtime, ``flask immutant events``."""

from __future__ import annotations

import datetime
import json
import re
import time
from typing import TYPE_CHECKING, Any

import click

from .. import startup
from ..cli import checked_option, echoed_as_json_or_empty, one_line_errors, state_and_store
from ..cli_table import cell, echo_table, printable
from ..hookspecs import hookimpl
from ..records import collecting
from ..settings import Setting, int_range

if TYPE_CHECKING:
    from .log import Event

MAXLEN = "IMMUTANT_EVENTS_MAXLEN"


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [Setting(MAXLEN, 10000, int_range(100), "Events the cluster event log keeps (the stream is trimmed "
                    "near this length; `flask immutant events`).", "int", env=True)]


@hookimpl(trylast=True)
def immutant_node_starting(node: Any) -> None:
    from . import log as event_log

    event_log.start(node.store, node.state.keys, node.identity.name, node.settings[MAXLEN])


@hookimpl(trylast=True)
def immutant_runtime_started(runtime: Any) -> None:
    from . import log as event_log

    state = runtime.state
    event_log.start(state.store, state.keys, state.node_name, state.settings[MAXLEN])


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(events)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: The latest timestamp ``--since`` takes (9999-12-31T23:59:59Z; a stream id holds far more).
LATEST = 253402300799.0
#: The longest duration ``--since`` takes: 100 years back (the log keeps far less).
LONGEST = 36500 * 86400.0
_WHAT = "a duration (30s, 10m, 2h, 1d) or a timestamp (2026-11-29T06:00:00Z, or epoch seconds)"


def since_value(text: str) -> tuple[str, float]:
    """``--since``: ``("ago", seconds)`` for a duration (``30s``, ``10m``, ``2h``, ``1d``), or
    ``("at", epoch)`` for a timestamp (ISO 8601, UTC unless it names a zone; or epoch seconds).
    A duration beyond :data:`LONGEST`, a time before the epoch or after :data:`LATEST`, ``nan``
    and ``inf`` are refused here, so the store is never asked for a stream id it cannot hold."""
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if not seconds <= LONGEST:  # also catches an overflow to inf
            raise ValueError(f"a duration of at most {LONGEST / 86400:.0f}d")
        return "ago", seconds
    try:
        when = float(text)
    except ValueError:
        try:
            parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=datetime.UTC)
            when = parsed.timestamp()
        except (ValueError, OverflowError):
            raise ValueError(_WHAT) from None
    if not 0 <= when <= LATEST:  # also nan, inf and -inf
        raise ValueError("a timestamp from 1970-01-01T00:00:00Z (epoch 0) to 9999-12-31T23:59:59Z "
                         f"(epoch {LATEST:.0f})")
    return "at", when


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _details(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in sorted(fields.items())
                    if v is not None)


HEADER = ("TIME (store, UTC)", "KIND", "NODE", "DETAILS")
#: Column widths while following (rows arrive one by one, so they cannot be fitted to the widest).
FOLLOW_WIDTHS = (24, 18, 16)


def _row(event: Event) -> tuple[str, str, str, str]:
    return _iso(event.time), event.kind, event.node, _details(event.fields)


def _line(cells: tuple[str, ...]) -> str:
    """One row while following: the widths of :data:`FOLLOW_WIDTHS`, the last column unpadded."""
    *padded, last = (cell(value) for value in cells)
    return "  ".join(text.ljust(width) for text, width in zip(padded, FOLLOW_WIDTHS, strict=True)) + "  " + last


@click.command(help="Show the cluster event log: joins, leaves, failovers, deploys, ctl actions, dead letters, "
               "store outages (docs/events.md).")
@click.option("--since", "since", callback=checked_option(since_value), metavar="WHEN",
              help="Only events since a duration ago (10m, 2h) or a timestamp (ISO 8601 UTC, or epoch seconds).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they are written (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event (one per line with --follow).")
@click.option("--count", "-n", type=click.IntRange(1), default=None, help="Only the newest N events.")
@click.pass_context
@one_line_errors
def events(ctx: click.Context, since: tuple[str, float] | None, follow: bool, as_json: bool,
           count: int | None) -> None:
    from . import log as event_log

    with state_and_store(ctx) as (state, store):
        start = None
        if since is not None:
            how, value = since
            if how == "ago":
                seconds, micros = store.time()
                value = max(0.0, seconds + micros / 1e6 - value)
            start = value
        if not follow:
            found = [e.to_dict() for e in event_log.read(store, state.keys, start, count)]
            if echoed_as_json_or_empty(found, as_json, "no events"):
                return
            echo_table(HEADER, [_row(event_log.Event(**item)) for item in found])
            return
        after = event_log.last_id(store, state.keys)
        backlog = (event_log.read(store, state.keys, start, count, until=after)
                   if (start is not None or count) and after != "0-0" else [])
        if not as_json:
            click.echo(_line(HEADER))
        startup.started()
        with collecting() as warnings:
            try:
                while True:
                    for event in backlog:
                        click.echo(json.dumps(event.to_dict(), sort_keys=True) if as_json else _line(_row(event)))
                    for warning in warnings:  # now, not when the command ends
                        click.echo(f"Warning: {printable(str(warning))}", err=True)
                    warnings.clear()
                    backlog, after = event_log.follow(store, state.keys, after)
            except KeyboardInterrupt:
                return
