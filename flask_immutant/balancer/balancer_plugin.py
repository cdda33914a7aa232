"""Built-in plugin: ``flask immutant balancer`` — the embedded balancer, or the HAProxy
reconciler with ``--haproxy SOCKET``, or ``--print-haproxy-config``."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import startup
from ..cli import LISTEN_PORT, load_state, one_line_errors, setup_logging
from ..errors import ImmutantError
from ..hookspecs import hookimpl
from ..loops import report_health, stop_reporting
from ..store import client_from_url, store_url

if TYPE_CHECKING:
    import redis

    from ..state import ImmutantState

log = logging.getLogger("flask_immutant.balancer")


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(balancer)


@click.command(help="Balance HTTP across the cluster's contexts: the embedded balancer (default), or keep "
                    "HAProxy's servers in line with them (--haproxy SOCKET). See docs/balancer.md.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the embedded balancer binds.")
@click.option("--port", default=8000, show_default=True, type=LISTEN_PORT,
              help="Port of the embedded balancer (0: any free one, printed at start).")
@click.option("--haproxy", "haproxy_socket", default=None, metavar="SOCKET",
              help="Drive HAProxy through the runtime API on this unix socket instead of serving.")
@click.option("--print-haproxy-config", "print_config", is_flag=True,
              help="Print an HAProxy configuration with one backend per known context path, and exit.")
@click.option("--bind", default=None, metavar="ADDR:PORT",
              help="With --print-haproxy-config: where HAProxy listens. Default: --host:--port.")
@click.option("--socket", "config_socket", default=None, metavar="PATH",
              help="With --print-haproxy-config: the runtime API socket. Default: IMMUTANT_HOME/haproxy.sock.")
@click.option("--context", "extra_paths", multiple=True, metavar="PATH",
              help="With --print-haproxy-config: a context path to give a backend even if nothing serves it yet.")
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="With --print-haproxy-config: write the configuration to this file.")
@click.option("--no-console", is_flag=True, help="Do not mount the console at /_immutant/.")
@click.option("--allow-remote", is_flag=True,
              help="Mount the console at /_immutant/ on a non-loopback --host too (put TLS in front of it).")
@click.option("--verbose", "-v", is_flag=True, help="Log debug messages.")
@click.pass_context
@one_line_errors
def balancer(ctx: click.Context, host: str, port: int, haproxy_socket: str | None, print_config: bool,
             bind: str | None, config_socket: str | None, extra_paths: tuple[str, ...], output: Path | None,
             no_console: bool, allow_remote: bool, verbose: bool) -> None:
    if not (print_config or haproxy_socket or no_console):
        from .console_plugin import refuse_remote_console

        refuse_remote_console(host, allow_remote, otherwise=", or --no-console to balance without it")
    state, _app, _path = load_state(ctx)
    if print_config:
        from ..contexts import registry
        from .haproxy import render_config

        store = client_from_url(store_url(state.settings, start=False))
        try:
            known = {context.context_path for context in registry.contexts(store, state.keys)}
        finally:
            store.close()
        paths = known | {"/" + p.strip("/") if p.strip("/") else "/" for p in extra_paths}
        socket_path = config_socket or str(Path(state.settings["IMMUTANT_HOME"]) / "haproxy.sock")
        try:
            text = render_config(paths, bind=bind or f"{host}:{port or 8000}", socket_path=socket_path,
                                 cookie_key=state.settings["IMMUTANT_CLUSTER"])
        except ValueError as exc:
            raise ImmutantError(str(exc)) from None
        if output is None:
            click.echo(text, nl=False)
        else:
            output.write_text(text)
            click.echo(f"wrote {output}: backends for {', '.join(sorted(paths))}", err=True)
        return
    setup_logging(verbose)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    store = client_from_url(store_url(state.settings, start=True))
    report_health(store, state.keys, f"balancer@{socket.gethostname()}", "balancer",
                  state.settings["IMMUTANT_FAILURE_TIMEOUT"])
    try:
        if haproxy_socket:
            _reconcile(store, state, haproxy_socket)
            return
        from .embedded import EmbeddedBalancer

        startup.started()
        EmbeddedBalancer(state, store=store, console=not no_console).run(host, port)
    finally:
        stop_reporting()


def _reconcile(store: redis.Redis, state: ImmutantState, socket_path: str) -> None:
    from .haproxy import Reconciler, ReconcilerLoop, RuntimeAPI

    if not Path(socket_path).exists():
        raise ImmutantError(f"--haproxy {socket_path}: no such socket; is HAProxy running with "
                            f"'stats socket {socket_path} level admin'?")
    loop = ReconcilerLoop(Reconciler(RuntimeAPI(socket_path)), store, state.keys)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    loop.start()
    log.info("reconciling HAProxy at %s with the contexts of cluster %s", socket_path,
             state.settings["IMMUTANT_CLUSTER"])
    startup.started()
    try:
        stop.wait()
    finally:
        loop.stop()
