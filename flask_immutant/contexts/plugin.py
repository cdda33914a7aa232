"""Built-in plugin: app runtimes publish their contexts; ``flask immutant ctl``; status section."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import click

from ..cli import echoed_as_json_or_empty, one_line_errors, state_and_store
from ..cli_table import echo_table, printable
from ..errors import ImmutantError
from ..hookspecs import hookimpl
from ..loops import Loop
from ..protocols import Slot
from ..settings import Setting, to_bool

if TYPE_CHECKING:
    import redis

    from ..protocols import RuntimeView
    from ..state import ImmutantState

log = logging.getLogger("flask_immutant.balancer")

FLAG = "IMMUTANT_CONTEXTS"


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [Setting(FLAG, True, to_bool, "Publish this app's context (host, port, load factor) for the "
                    "balancers, as mod_cluster does.", "bool")]


class ContextPublisher:
    """Keeps one runtime's context in the store while it runs."""

    def __init__(self, runtime: RuntimeView) -> None:
        from ..cluster.identity import NodeIdentity
        from ..server.environ import DeploymentEnviron
        from . import registry  # here: loading the plugin (every command does) stays light

        self.runtime = runtime
        state = runtime.state
        self.keys = state.keys
        self.store = state.store
        self.ttl = state.settings["IMMUTANT_FAILURE_TIMEOUT"]
        identity = NodeIdentity.from_settings(state.settings)
        deployment = DeploymentEnviron.current()
        self.base = registry.Context(
            node=state.node_name, context_path=runtime.context_path,
            app=deployment.name or runtime.app.name, host=identity.address, port=runtime.port,
            load=100, pid=os.getpid(), since=time.time(),
        )
        self._cpu_sample = (time.process_time(), time.monotonic())
        self._loop = Loop("context", self._publish, self.ttl / 4, wait_first=True, backoff_cap=self.ttl / 4)

    def start(self) -> None:
        from . import registry

        self._publish()
        registry.announce(self.store, self.keys, self.base.key)
        self._loop.start()

    def stop(self) -> None:
        import redis

        from . import registry

        self._loop.stop()
        try:
            registry.withdraw(self.store, self.keys, self.base.node, self.base.context_path, self.base.pid)
        except redis.RedisError as exc:
            log.warning("could not withdraw context %s (%s); it expires in %.1fs", self.base.key, exc, self.ttl)

    def _publish(self) -> None:
        from . import registry

        load = registry.load_factor(self.runtime.active_requests, self.runtime.settings["IMMUTANT_THREADS"],
                                    self._cpu_share(), 1)
        registry.publish(self.store, self.keys, registry.Context(**{**self.base.status(), "load": load}), self.ttl)

    def _cpu_share(self) -> float:
        """CPU seconds this runtime used per second since the last look: a Python process with
        one GIL is saturated near 1.0. Its own share, not the machine's load average, so nodes
        sharing a busy machine are not all read as saturated by each other's work."""
        used, now = time.process_time(), time.monotonic()
        previous_used, previous_now = self._cpu_sample
        self._cpu_sample = (used, now)
        elapsed = now - previous_now
        return (used - previous_used) / elapsed if elapsed > 0 else 0.0


#: Where a runtime's publisher is kept in its app's state.
PUBLISHER: Slot[ContextPublisher] = Slot("context-publisher")


@hookimpl(trylast=True)
def immutant_runtime_started(runtime: RuntimeView) -> None:
    publisher = runtime.state.put(PUBLISHER, ContextPublisher(runtime))
    publisher.start()


@hookimpl(trylast=True)
def immutant_runtime_stopping(runtime: RuntimeView) -> None:
    """Balancers stop sending new requests while the runtime drains (trylast like every built-in;
    registered after most features, it still runs before them)."""
    publisher = runtime.state.pop(PUBLISHER)
    if publisher is not None:
        publisher.stop()


@hookimpl(trylast=True)
def immutant_status(state: ImmutantState, store: redis.Redis) -> dict[str, Any]:
    from . import registry

    return {"contexts": [context.status() for context in registry.contexts(store, state.keys)]}


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(ctl)


@click.group(help="Control contexts, as mod_cluster does: enable, disable (drain), stop, weight, show.")
def ctl() -> None:
    pass


def _scope_options(func: Any) -> Any:
    func = click.option("--future", is_flag=True, help="Store it even if no such node or context runs now "
                        "(for one that starts later).")(func)
    func = click.option("--context", "context_path", default=None, help="Only this context path.")(func)
    return click.option("--node", default=None, help="Only this node.")(func)


def _check_scope(state: ImmutantState, store: redis.Redis, node: str | None, context_path: str | None,
                 future: bool) -> None:
    """A node or context nobody runs is a typo, unless ``--future`` says it is meant for a later one."""
    from ..cluster.membership import live_members
    from ..deploy.plugin import deployment_store
    from ..deploy.records import Deployment
    from . import registry

    live = registry.contexts(store, state.keys)
    nodes = {m.name for m in live_members(store, state.keys, state.settings["IMMUTANT_FAILURE_TIMEOUT"])}
    nodes |= {c.node for c in live}
    paths = {c.context_path for c in live}
    paths |= {d.context_path for d in deployment_store(state, store).all().values() if isinstance(d, Deployment)}
    unknown = []
    if node is not None and node not in nodes:
        unknown.append(f"no node named {node!r} is running (running: {', '.join(sorted(nodes)) or 'none'})")
    if context_path is not None and context_path not in paths:
        known = ", ".join(sorted(paths)) or "none"
        unknown.append(f"no context {context_path!r} is served or deployed (known: {known})")
    if not unknown:
        return
    if not future:
        raise ImmutantError("; ".join(unknown) + "; add --future to store it for one that starts later")
    click.echo(printable(f"stored for the future: {'; '.join(unknown)}"))


def _where(node: str | None, context_path: str | None) -> str:
    parts = [f"node {node}" if node else "", f"context {context_path}" if context_path else ""]
    return " ".join(filter(None, parts)) or "every node and context"


def _state_command(name: str, state_name: str, help_text: str) -> click.Command:
    """``ctl enable|disable|stop``: one command per state, the same but for the state it sets."""

    @ctl.command(name, help=help_text)
    @_scope_options
    @click.pass_context
    @one_line_errors
    def command(ctx: click.Context, node: str | None, context_path: str | None, future: bool) -> None:
        from . import registry

        with state_and_store(ctx) as (state, store):
            _check_scope(state, store, node, context_path, future)
            registry.set_control(store, state.keys, state_name, node, context_path)
        click.echo(f"{state_name}: {_where(node, context_path)}")

    return command


enable = _state_command("enable", "ENABLED", "Send new and existing sessions to the context(s).")
disable = _state_command("disable", "DISABLED", "Drain: only sessions already bound to the node go there.")
stop = _state_command("stop", "STOPPED", "Send no requests to the context(s).")


@ctl.command(help="Set the load factor (0-100) balancers use, or 'auto' for the computed one.")
@click.argument("weight")
@_scope_options
@click.pass_context
@one_line_errors
def weight(ctx: click.Context, weight: str, node: str | None, context_path: str | None, future: bool) -> None:
    if weight != "auto" and not weight.isdigit():
        raise ImmutantError(f"weight {weight!r}: expected 0-100 or 'auto'")
    from . import registry

    with state_and_store(ctx) as (state, store):
        _check_scope(state, store, node, context_path, future)
        registry.set_weight(store, state.keys, None if weight == "auto" else int(weight), node, context_path)
    click.echo(f"weight {weight}: {_where(node, context_path)}")


@ctl.command(help="Show every context: node, path, address, state, load factor.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@one_line_errors
def show(ctx: click.Context, as_json: bool) -> None:
    from . import registry

    with state_and_store(ctx) as (state, store):
        found = registry.contexts(store, state.keys)
    if echoed_as_json_or_empty([c.status() for c in found], as_json, "no contexts"):
        return
    echo_table(("CONTEXT", "NODE", "ADDRESS", "STATE", "WEIGHT", "LOAD", "APP"),
               ([c.context_path, c.node, f"{c.host}:{c.port}", c.state, c.weight, c.load, c.app] for c in found),
               right={"WEIGHT", "LOAD"})
