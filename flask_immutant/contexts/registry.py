"""Contexts: what each app runtime serves, where, how loaded, and in which state.

An app runtime publishes its context (node, context path, host, port, load factor) once it is
ready, refreshed every quarter of the failure timeout with a TTL of the timeout, so a dead node's
contexts disappear within it; it withdraws it first thing when it stops. Operators set states
(ENABLED, DISABLED, STOPPED) and manual load factors at four scopes — all, a node, a context
path, a node's context — and the most specific one wins. Balancers read :func:`routing_table`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple, cast

import redis

from .. import events, lua, names
from ..errors import ImmutantError
from ..keys import Keys
from ..records import MALFORMED, check_types, decoded, json_object, read_records, set_of, shown, warn

#: ENABLED: new and existing sessions; DISABLED: only sessions already bound to the node (drain);
#: STOPPED: nothing. In this order from least to most strict.
STATES = ("ENABLED", "DISABLED", "STOPPED")
ANY = "*"


@dataclass(frozen=True)
class Context:
    node: str
    context_path: str
    app: str
    host: str
    port: int
    load: int  # computed load factor, 1 (saturated) to 100 (idle), mod_cluster style
    pid: int
    since: float
    state: str = "ENABLED"  # effective, after the operator's controls
    weight: int = 100  # effective load factor: a manual one (ctl weight) or ``load``

    def __post_init__(self) -> None:
        """A context read from the store reaches balancer configuration and HAProxy commands: the
        :mod:`..names` rules hold for it, or it is not a context (ValueError)."""
        names.checked(names.name, self.node, "node")
        names.checked(names.host, self.host, "host")
        if names.context_path(self.context_path) != self.context_path:
            raise ValueError(f"context path {self.context_path!r} is not in its normal form")
        for number in (self.port, self.load, self.pid, self.weight):
            if isinstance(number, bool) or not isinstance(number, int):
                raise ValueError(f"context {self.node}|{self.context_path}: port, load, pid, weight are integers")
        if not 0 < self.port < 65536:
            raise ValueError(f"context {self.node}|{self.context_path}: port {self.port} is not a TCP port")
        if not (0 <= self.load <= 100 and 0 <= self.weight <= 100):
            raise ValueError(f"context {self.node}|{self.context_path}: load and weight are 0-100")

    @property
    def key(self) -> str:
        return f"{self.node}|{self.context_path}"

    def status(self) -> dict[str, Any]:
        return asdict(self)


class Server(NamedTuple):
    """One server of a context path, as a balancer sees it (HAProxy's word: a backend holds servers).
    A named tuple: only balancers make them, and a frozen dataclass's creation costs every command
    that reads contexts (``status``) 0.4 ms."""

    node: str
    host: str
    port: int
    weight: int
    state: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def publish(store: redis.Redis, keys: Keys, context: Context, ttl: float) -> None:
    key = keys.context(context.node, context.context_path)
    record = {k: v for k, v in context.status().items() if k not in ("state", "weight")}
    pipe = store.pipeline()
    pipe.set(key, json.dumps(record), px=int(ttl * 1000))
    pipe.sadd(keys.contexts, key)
    pipe.execute()


def announce(store: redis.Redis, keys: Keys, what: str) -> None:
    store.publish(keys.contexts_changed, what)


def withdraw(store: redis.Redis, keys: Keys, node: str, context_path: str, pid: int) -> bool:
    script = lua.script(store, "contexts/registry_withdraw")
    return bool(script(keys=[keys.context(node, context_path), keys.contexts, keys.contexts_changed], args=[pid]))


def contexts(store: redis.Redis, keys: Keys) -> list[Context]:
    """Every live context with its effective state and weight, sorted by path then node."""
    members = set_of(store, keys.contexts, "context")
    if not members:
        return []
    pipe = store.pipeline(transaction=False)
    for key in members:
        pipe.get(key)
    pipe.hgetall(keys.context_control)
    pipe.hgetall(keys.context_weight)
    *raws, control_raw, weight_raw = pipe.execute(raise_on_error=False)
    control = read_records(_hash_or_nothing(control_raw, keys.context_control), "context control", _control_state)
    weights = read_records(_hash_or_nothing(weight_raw, keys.context_weight), "context weight", _weight)
    found, stale = [], []
    for key, raw in zip(members, raws, strict=True):
        if raw is None:
            stale.append(key)
            continue
        try:
            if isinstance(raw, Exception):
                raise raw
            data = json_object(key, raw)
            check_types(data, CONTEXT_TYPES)
            context = Context(**{k: data[k] for k in Context.__dataclass_fields__ if k in data})
        except MALFORMED as exc:
            warn(f"skipped the context record {shown(key)}: {type(exc).__name__}: {exc}")
            stale.append(key)
            continue
        manual = _most_specific(weights, context.node, context.context_path)
        found.append(replace(
            context,
            state=_most_specific(control, context.node, context.context_path, _strictest_state) or "ENABLED",
            weight=manual if manual is not None else context.load,
        ))
    if stale:
        store.srem(keys.contexts, *stale)
    return sorted(found, key=lambda c: (c.context_path, c.node))


#: The JSON types of a stored context's fields (anything else is skipped as malformed).
CONTEXT_TYPES: dict[str, type] = {"node": str, "context_path": str, "app": str, "host": str, "port": int,
                                  "load": int, "pid": int, "since": float}


def _hash_or_nothing(raw: Any, key: str) -> dict[Any, Any]:
    """A HGETALL result from ``execute(raise_on_error=False)``: an error (the key is no hash) is empty."""
    if isinstance(raw, redis.ResponseError):
        warn(f"skipped {key}: {raw}")
        return {}
    if isinstance(raw, Exception):
        raise raw
    return cast("dict[Any, Any]", raw)  # redis-py's untyped HGETALL reply


def _control_state(_scope: str, raw: Any) -> str:
    state = decoded(raw)
    if state not in STATES:
        raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
    return state


def _weight(_scope: str, raw: Any) -> int:
    value = int(raw)
    if not 0 <= value <= 100:
        raise ValueError(f"weight {value} is not 0-100")
    return value


def routing_table(store: redis.Redis, keys: Keys) -> dict[str, list[Server]]:
    """Context path -> its servers (every state: a balancer needs DISABLED ones for stickiness)."""
    table: dict[str, list[Server]] = {}
    for context in contexts(store, keys):
        table.setdefault(context.context_path, []).append(
            Server(context.node, context.host, context.port, context.weight, context.state))
    return table


def _most_specific(entries: dict[str, Any], node: str, context_path: str, stricter: Any = min) -> Any:
    """A node's context, then a node or a context path (both set: the stricter), then all."""
    exact = entries.get(f"{node}|{context_path}")
    if exact is not None:
        return exact
    partial = [v for v in (entries.get(f"{node}|{ANY}"), entries.get(f"{ANY}|{context_path}")) if v is not None]
    if partial:
        return stricter(partial)
    return entries.get(f"{ANY}|{ANY}")


def _strictest_state(states: list[str]) -> str:
    return max(states, key=STATES.index)


def _scope(node: str | None, context_path: str | None) -> str:
    return f"{node or ANY}|{context_path or ANY}"


def _checked_scope(node: str | None, context_path: str | None) -> tuple[str | None, str | None]:
    """A scope from the CLI or the console: a valid node name and a normalised context path."""
    try:
        return (None if node is None else names.checked(names.name, node, "node"),
                None if context_path is None else names.checked(names.context_path, context_path, "context path"))
    except ValueError as exc:
        raise ImmutantError(str(exc)) from None


def _narrower(entries: Iterable[str], node: str | None, context_path: str | None) -> list[str]:
    """Entries at or under a scope: setting a scope overrides what was set inside it."""
    found = []
    for entry in entries:
        entry_node, _, entry_path = entry.partition("|")
        if (node is None or entry_node == node) and (context_path is None or entry_path == context_path):
            found.append(entry)
    return found


def set_control(store: redis.Redis, keys: Keys, state: str, node: str | None = None,
                context_path: str | None = None, by: str | None = None) -> None:
    """``ctl enable|disable|stop`` at a scope (``None`` = every node / every context); ``by``: who,
    for the ``ctl.action`` event written with it."""
    if state not in STATES:
        raise ImmutantError(f"state {state!r}: expected one of {', '.join(STATES)}")
    node, context_path = _checked_scope(node, context_path)
    existing = [k for k in map(decoded, store.hkeys(keys.context_control)) if k is not None]
    pipe = store.pipeline()
    for entry in _narrower(existing, node, context_path):
        pipe.hdel(keys.context_control, entry)
    if not (state == "ENABLED" and node is None and context_path is None):
        pipe.hset(keys.context_control, _scope(node, context_path), state)
    pipe.publish(keys.contexts_changed, f"control {state} {_scope(node, context_path)}")
    events.record(pipe, keys, "ctl.action", action=state.lower(), scope_node=node, context_path=context_path,
                  by=by or events.who())
    pipe.execute()


def set_weight(store: redis.Redis, keys: Keys, weight: int | None, node: str | None = None,
               context_path: str | None = None, by: str | None = None) -> None:
    """``ctl weight N`` (1-100) at a scope; ``None`` returns it to the computed load factor."""
    if weight is not None and not 0 <= weight <= 100:
        raise ImmutantError(f"weight {weight}: expected 0-100, or 'auto' for the computed load factor")
    node, context_path = _checked_scope(node, context_path)
    existing = [k for k in map(decoded, store.hkeys(keys.context_weight)) if k is not None]
    pipe = store.pipeline()
    for entry in _narrower(existing, node, context_path):
        pipe.hdel(keys.context_weight, entry)
    if weight is not None:
        pipe.hset(keys.context_weight, _scope(node, context_path), weight)
    pipe.publish(keys.contexts_changed, f"weight {weight} {_scope(node, context_path)}")
    events.record(pipe, keys, "ctl.action", action="weight", scope_node=node, context_path=context_path,
                  weight=weight, by=by or events.who())
    pipe.execute()


def load_factor(active_requests: int, threads: int, cpu_load: float, cpus: int) -> int:
    """mod_cluster-style load factor: 100 idle, 1 saturated; the busier of the request threads
    in use and the CPU used (``cpu_load`` CPU-seconds per second, out of ``cpus``) decides."""
    busy = active_requests / max(1, threads)
    cpu = cpu_load / max(1, cpus)
    return max(1, min(100, round(100 * (1 - min(1.0, max(busy, cpu))))))
