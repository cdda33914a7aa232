"""Built-in plugin: Prometheus metrics (``IMMUTANT_METRICS``), served per node and printed by
``flask immutant metrics`` (docs/metrics.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..cli import load_state, one_line_errors
from ..errors import ImmutantError
from ..hookspecs import hookimpl
from ..settings import Setting, networks, to_bool
from .http import METRICS_PATH

if TYPE_CHECKING:
    from flask import Flask

    from ..extension import ImmutantState
    from ..server.node import Node

#: The setting that turns this feature on; off, the plugin is unregistered.
FLAG = "IMMUTANT_METRICS"


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [
        Setting(FLAG, False, to_bool, f"Serve Prometheus metrics at {METRICS_PATH} on each node's HTTP port "
                "(docs/metrics.md).", "bool", env=True),
        Setting("IMMUTANT_METRICS_ALLOW", (), networks, "Addresses or networks (comma-separated) besides loopback "
                "that may read the metrics path, such as your Prometheus server's; 0.0.0.0/0,::/0 for anyone.",
                "list", env=True),
    ]


@hookimpl(trylast=True)
def immutant_init_app(app: Flask, state: ImmutantState) -> None:
    from .cluster import ClusterCollector
    from .http import serving_metrics
    from .process import enable, render

    enable()
    collector = ClusterCollector(state)
    app.wsgi_app = serving_metrics(  # type: ignore[method-assign,assignment]  # Flask's documented way to add middleware
        app.wsgi_app, state.settings["IMMUTANT_METRICS_ALLOW"], lambda: render([collector]))


@hookimpl(trylast=True)
def immutant_node_starting(node: Node) -> None:
    from .process import prepare_folder

    prepare_folder(node.identity.data_dir)  # before any runtime starts: they inherit the variable


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(metrics)


@click.command(help=f"Print a node's metrics (Prometheus text format) from its {METRICS_PATH}.")
@click.option("--url", default=None, help=f"The node's base URL; default: this machine's node at the given "
              f"--port-offset (IMMUTANT_HOST, IMMUTANT_HTTP_PORT). {METRICS_PATH} is added.")
@click.option("--port-offset", type=int, default=None, help="The local node's port offset (IMMUTANT_PORT_OFFSET).")
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=10.0, show_default=True,
              help="Seconds to wait for the node.")
@click.pass_context
@one_line_errors
def metrics(ctx: click.Context, /, url: str | None, port_offset: int | None, timeout: float) -> None:
    if url is None:
        from ..cluster.identity import NodeIdentity

        state, _app, _path = load_state(ctx, {"IMMUTANT_PORT_OFFSET": port_offset})
        identity = NodeIdentity.from_settings(state.settings)
        host = identity.host if identity.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        url = f"http://{f'[{host}]' if ':' in host else host}:{identity.http_port}"
    click.echo(fetch(url.rstrip("/") + METRICS_PATH, timeout), nl=False)


def fetch(url: str, timeout: float) -> str:
    """The metrics text at ``url``, or an :class:`ImmutantError` saying in one line why not."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ImmutantError(f"--url {url!r} is not allowed: expected http://host:port or https://host:port")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read(400).decode("utf-8", "replace").strip().splitlines()
        why = {404: "metrics are off on that node (set IMMUTANT_METRICS=1 where the node runs)",
               503: "no app runtime serves that node's HTTP port yet (a node waiting for deployments)"}
        raise ImmutantError(f"{url} answered {exc.code}: {why.get(exc.code) or (detail[0] if detail else exc.reason)}"
                            ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImmutantError(f"no node answers at {url}: {reason} (is it running? --url or --port-offset "
                            "picks another)") from None
