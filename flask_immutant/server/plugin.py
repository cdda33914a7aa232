"""Built-in plugin: ``flask immutant run``."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import click

from .. import startup
from ..cli import load_state, one_line_errors, setup_logging
from ..hookspecs import hookimpl
from ..logs import say
from ..settings import unknown_environment


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(run)


@click.command(help="Start a cluster node; with an app (--app or found here) it serves it.")
@click.option("--clustered/--no-clustered", default=None, help="Join the cluster (IMMUTANT_CLUSTERED).")
@click.option("--node-name", default=None, help="Node name (IMMUTANT_NODE_NAME); default: host name + offset.")
@click.option("--port-offset", type=int, default=None, help="Added to every port (IMMUTANT_PORT_OFFSET).")
@click.option("--host", default=None, help="Address to bind (IMMUTANT_HOST), default 127.0.0.1.")
@click.option("--advertise-host", default=None,
              help="Address other nodes and balancers reach this node at (IMMUTANT_ADVERTISE_HOST).")
@click.option("--threads", type=int, default=None, help="HTTP threads per app runtime (IMMUTANT_THREADS).")
@click.option("--home", default=None, help="Folder for the store and node data (IMMUTANT_HOME).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
@one_line_errors
def run(ctx: click.Context, /, verbose: bool, **options: Any) -> None:
    overrides = {
        "IMMUTANT_CLUSTERED": options["clustered"],
        "IMMUTANT_NODE_NAME": options["node_name"],
        "IMMUTANT_PORT_OFFSET": options["port_offset"],
        "IMMUTANT_HOST": options["host"],
        "IMMUTANT_ADVERTISE_HOST": options["advertise_host"],
        "IMMUTANT_THREADS": options["threads"],
        "IMMUTANT_HOME": options["home"],
    }
    from .zygote import start_template

    start_template()  # before the app is loaded: the template's imports overlap with all of the node's start
    state, app, import_path = load_state(ctx, overrides)
    offset_given = options["port_offset"] is not None or "IMMUTANT_PORT_OFFSET" in os.environ or (
        app is not None and "IMMUTANT_PORT_OFFSET" in app.config and app.config["IMMUTANT_PORT_OFFSET"] != 0
    )
    from .node import AppTarget, Node  # here: other commands never import the node and runtime

    target = AppTarget(import_path) if app is not None else None
    node = Node(state, target, offset_given=offset_given)
    setup_logging(verbose, state.settings["IMMUTANT_LOG_FORMAT"], node=node.identity.name)
    say(node.banner())
    for warning in unknown_environment(state.settings.rows):
        logging.getLogger("flask_immutant.node").warning("environment: %s", warning)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: node.stop_requested.set())
    try:
        node.start()
        assert node.membership is not None
        say(f"node {node.identity.name} joined cluster {state.keys.cluster}")
        startup.started()
        node.run()
    finally:
        node.stop()
    from .runtime import exit_now

    exit_now(0)  # stopped cleanly: unloading every library would only add to the stop time
