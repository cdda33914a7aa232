"""Built-in plugin: ``flask immutant console``, the management page on its own (HAProxy setups).

The embedded balancer serves the same page at ``/_immutant/``; this command is for clusters whose
balancer is HAProxy. It binds to localhost unless told otherwise, since its actions control
where the cluster's traffic goes.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import click

from .. import startup
from ..cli import LISTEN_PORT, load_state, one_line_errors, setup_logging
from ..errors import ImmutantError
from ..hookspecs import hookimpl
from ..logs import say

#: Default port of ``flask immutant console``.
DEFAULT_PORT = 8001


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(console)


@hookimpl(trylast=True)
def immutant_node_started(node: Any) -> None:
    """Every node samples the cluster for the console's charts (one sample per slot in all)."""
    from .history import SAMPLER, Sampler

    node.state.put(SAMPLER, Sampler(node.state).start())


@hookimpl(trylast=True)
def immutant_node_stopping(node: Any) -> None:
    from .history import SAMPLER

    sampler = node.state.pop(SAMPLER)
    if sampler is not None:
        sampler.stop()


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); a host name is not trusted to be one."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_remote_console(host: str, allow_remote: bool, *, otherwise: str = "") -> None:
    """The one rule for where the console is served, by ``console`` and by the balancer that mounts
    it: on a loopback address, or anywhere with ``--allow-remote``."""
    if is_loopback(host) or allow_remote:
        return
    raise ImmutantError(f"--host {host} is not a loopback address; the console controls the cluster, "
                        f"so add --allow-remote to serve it there (with TLS in front){otherwise}")


@click.command(help="Serve the management console (nodes, contexts, deployments, daemons, queues, jobs, "
                    "with enable/disable/stop) on its own; the embedded balancer serves it at /_immutant/.")
@click.option("--port", type=LISTEN_PORT, default=DEFAULT_PORT, show_default=True, help="Port to serve on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback unless --allow-remote).")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host (put TLS in front of it).")
@click.option("--verbose", is_flag=True, help="Log every request.")
@click.pass_context
@one_line_errors
def console(ctx: click.Context, port: int, host: str, allow_remote: bool, verbose: bool) -> None:
    refuse_remote_console(host, allow_remote)
    from aiohttp import web
    from aiohttp.log import access_logger

    from ..deploy.records import cluster_secret
    from .console import make_console_app
    from .parse_errors import log_parse_errors_briefly

    setup_logging(verbose)
    log_parse_errors_briefly()
    state, _app, _path = load_state(ctx)
    secret = cluster_secret(state.settings)
    where = ("IMMUTANT_SECRET" if state.settings.get("IMMUTANT_SECRET")
             else str(Path(state.settings["IMMUTANT_HOME"]) / "secret"))
    app = make_console_app(state, secret=secret)
    shown = f"[{host}]" if ":" in host else host

    def started(_message: str) -> None:
        say(f"console for cluster {state.settings['IMMUTANT_CLUSTER']} on http://{shown}:{port}/ "
            f"(log in with the cluster secret: {where})", "flask_immutant.console")

    startup.started()
    web.run_app(app, host=host, port=port, print=started, access_log=None if not verbose else access_logger,
                handle_signals=True)
