"""Built-in plugin: deployments. Nodes deploy what the cluster lists; ``deploy``, ``undeploy``
and ``list`` commands; the ``deployments`` status section."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import redis

from .. import names
from ..cli import WAIT_SECONDS, checked_option, echoed_as_json_or_empty, load_state, one_line_errors, state_and_store
from ..cli_table import echo_table, printable
from ..cluster.membership import live_members
from ..errors import ImmutantError
from ..hookspecs import hookimpl
from ..loops import Loop
from ..protocols import Slot
from ..settings import Setting, int_range, resolve, to_bool
from ..store import existing_store
from .records import Deployment, DeploymentError, cluster_secret
from .store import DeploymentStore

if TYPE_CHECKING:
    from ..server.node import Node
    from ..state import ImmutantState
    from .deployer import Deployer

log = logging.getLogger("flask_immutant.deploy")

FLAG = "IMMUTANT_DEPLOYMENTS"
#: The node's deployer and deployment-folder scan, in the node's state.
DEPLOYER: Slot[Deployer] = Slot("deployer")
FOLDER_SCAN: Slot[Loop] = Slot("deploy-folder")


def _secret(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or len(value) < 16:
        raise ValueError("a string of at least 16 characters (every node and deploying machine must share it)")
    return value


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [
        Setting(FLAG, True, to_bool, "Deploy what `flask immutant deploy` registers in the cluster on this "
                "node.", "bool", env=True),
        Setting("IMMUTANT_SECRET", None, _secret, "Cluster secret that signs deployments (HMAC). Unset: one "
                "generated into IMMUTANT_HOME/secret, shared by that machine's nodes.", "secret", env=True),
        Setting("IMMUTANT_ARCHIVE_LIMIT", 50 * 1024 * 1024, int_range(1024), "Largest app archive, unpacked, "
                "in bytes.", "int", env=True),
    ]


def deployment_store(state: ImmutantState, store: redis.Redis) -> DeploymentStore:
    return DeploymentStore(store, state.keys, cluster_secret(state.settings))


@hookimpl(trylast=True)
def immutant_node_started(node: Node) -> None:
    from .deployer import Deployer  # here: only a node runs the deployer and the folder scan
    from .folder import DeploymentFolder

    assert node.store is not None
    store = deployment_store(node.state, node.store)
    deployer = Deployer(node, store, node.settings["IMMUTANT_ARCHIVE_LIMIT"])
    node.state.put(DEPLOYER, deployer).start()
    folder = DeploymentFolder(Path(node.settings["IMMUTANT_HOME"]) / "deployments", store)
    node.state.put(FOLDER_SCAN, Loop("deploy-folder", folder.scan, 1.0, wait_first=True,
                                     stop_event=node.stop_requested).start())


@hookimpl(trylast=True)
def immutant_node_stopping(node: Node) -> None:
    watcher = node.state.pop(FOLDER_SCAN)
    if watcher is not None:
        watcher.stop()
    deployer = node.state.pop(DEPLOYER)
    if deployer is not None:
        deployer.stop()
        for name in list(deployer.store.all()):
            deployer.store.clear_node_state(name, node.identity.name)


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(deploy)
    cli.add_command(undeploy)
    cli.add_command(list_deployments)


@hookimpl(trylast=True)
def immutant_status(state: ImmutantState, store: redis.Redis) -> dict[str, Any]:
    return {"deployments": deployment_listing(state, store)}


def deployment_listing(state: ImmutantState, store: redis.Redis) -> list[dict[str, Any]]:
    """Each deployment with its state on each live node."""
    from ..contexts.registry import contexts

    deployments = deployment_store(state, store)
    stored = deployments.all()
    if not stored:
        return []  # then no node's state or balancer to read
    live = {m.name for m in live_members(store, state.keys, state.settings["IMMUTANT_FAILURE_TIMEOUT"])}
    balancing = {(c.node, c.context_path): c for c in contexts(store, state.keys)}
    rows: list[dict[str, Any]] = []
    for name, item in sorted(stored.items()):
        nodes = {node: info for node, info in deployments.node_states(name).items() if node in live}
        for node, info in nodes.items():
            context = balancing.get((node, info.get("context_path", "/")))
            info["balancer"] = {"state": context.state, "weight": context.weight} if context else None
        if isinstance(item, DeploymentError):
            rows.append({"name": name, "error": str(item), "nodes": nodes})
            continue
        rows.append({
            "name": name, "version": item.version, "context_path": item.context_path,
            "mode": "archive" if item.archive else "path", "root": item.root, "app": item.import_path,
            "deployed_at": item.deployed_at, "deployed_by": item.deployed_by, "nodes": nodes,
        })
    return rows


def split_import_path(import_path: str | None, cwd: str) -> tuple[str | None, str]:
    """(import path relative to the root, root folder) for what ``flask --app`` was given."""
    if not import_path:
        return None, cwd
    path, colon, attribute = import_path.partition(":")
    if path.endswith(".py") or os.sep in path:
        full = os.path.abspath(os.path.join(cwd, path))
        root, module = os.path.split(full)
        module = module.removesuffix(".py")
        return module + (colon + attribute if colon else ""), root
    return import_path, cwd


def _parse_sets(pairs: tuple[str, ...], state: ImmutantState) -> dict[str, str]:
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ImmutantError(f"--set {pair!r}: expected KEY=VALUE")
        settings[key] = value
    immutant = {k: v for k, v in settings.items() if k.startswith("IMMUTANT_")}
    resolve(state.settings.rows, overrides=immutant, environ={})  # a wrong key or value fails here
    return settings


@click.command(help="Deploy the app (--app, or the one Flask finds here) to every node of the cluster.")
@click.option("--name", default=None, callback=checked_option(names.name),
              help="Deployment name; default: the app's folder name.")
@click.option("--context-path", default="/", show_default=True, callback=checked_option(names.context_path),
              help="URL prefix the app is served under.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="A setting or config value for it.")
@click.option("--archive", is_flag=True, help="Ship the app folder in the cluster store (nodes share no disk).")
@click.option("--rollback", is_flag=True, help="A deliberate rollback: nodes that ran a newer version of this "
              "name accept this one (see docs/deploy.md).")
@click.option("--wait", type=float, default=15.0, show_default=True, callback=WAIT_SECONDS,
              help="Seconds to wait for the nodes.")
@click.pass_context
@one_line_errors
def deploy(ctx: click.Context, name: str | None, context_path: str, sets: tuple[str, ...], archive: bool,
           rollback: bool, wait: float) -> None:
    state, app, import_path = load_state(ctx)
    if app is None:
        raise ImmutantError("no app to deploy here: run this in the app's folder, or give --app")
    module, root = split_import_path(import_path, os.getcwd())
    if name is None:
        folder = os.path.basename(root.rstrip(os.sep)) or "app"
        try:
            name = names.name(folder)
        except ValueError as exc:
            raise ImmutantError(f"the app's folder name {folder!r} is not a deployment name ({exc}); "
                                "give one with --name") from None
    settings = _parse_sets(sets, state)
    with existing_store(state.settings) as store:
        deployments = deployment_store(state, store)
        data, digest = (None, None)
        if archive:
            data, digest = _pack(root, state.settings["IMMUTANT_ARCHIVE_LIMIT"])
        record = deployments.put(Deployment(
            name=name, import_path=module, root=root, context_path=context_path, settings=settings,
            archive=digest, deployed_by=f"{os.environ.get('USER', '?')}@{socket.gethostname()}",
        ), archive=data, rollback=rollback)
        click.echo(f"deployment {record.label} registered: {module or '(app found in folder)'} in {root}"
                   + (f" (archive {digest[:12]}, {len(data or b'')} bytes)" if digest else ""))
        failures = _await_nodes(state, store, deployments, record, wait)
    if failures:
        raise ImmutantError(f"{record.label} is not deployed on {', '.join(failures)} "
                            "(failed or no answer; see above)")


def _pack(root: str, limit: int) -> tuple[bytes, str]:
    from . import archive  # tarfile, only for `deploy --archive`

    try:
        return archive.pack(root, limit)
    except DeploymentError as exc:
        raise ImmutantError(str(exc)) from None


def _await_nodes(state: ImmutantState, store: redis.Redis, deployments: DeploymentStore, record: Deployment,
                 wait: float) -> list[str]:
    members = [m.name for m in live_members(store, state.keys, state.settings["IMMUTANT_FAILURE_TIMEOUT"])
               if m.clustered or not state.settings["IMMUTANT_CLUSTERED"]]
    if not members:
        click.echo("no node is running: it deploys when one starts (`flask immutant run --clustered`)")
        return []
    deadline = time.monotonic() + wait
    reported: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(reported) < len(members):
        for node, info in deployments.node_states(record.name).items():
            if node in members and node not in reported and info.get("version") == record.version \
                    and info.get("deployed_at") == record.deployed_at \
                    and info.get("state") in ("deployed", "failed", "refused"):
                reported[node] = info
                where = f"port {info.get('port')}{record.context_path}" if info.get("port") else ""
                detail = f": {info.get('error')}" if info["state"] != "deployed" else f" ({where})"
                click.echo(printable(f"  {node}: {info['state']}{detail}"))
        time.sleep(0.05)
    silent = [node for node in members if node not in reported]
    for node in silent:
        click.echo(f"  {node}: no answer within {wait:g}s (see its log)")
    return [node for node, info in reported.items() if info["state"] != "deployed"] + silent


@click.command(help="Undeploy NAME from every node: daemons stop, listeners stop, the runtimes exit.")
@click.argument("name")  # any name: a garbage record written into the store can be removed too
@click.option("--wait", type=float, default=15.0, show_default=True, callback=WAIT_SECONDS,
              help="Seconds to wait for the nodes.")
@click.pass_context
@one_line_errors
def undeploy(ctx: click.Context, name: str, wait: float) -> None:
    with state_and_store(ctx) as (state, store):
        deployments = deployment_store(state, store)
        if not deployments.remove(name):
            known = ", ".join(sorted(deployments.all())) or "none"
            raise ImmutantError(f"no deployment named {name!r} (deployed: {known})")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and deployments.node_states(name):
            time.sleep(0.05)
        left = sorted(deployments.node_states(name))
        click.echo(printable(f"undeployed {name}" + (f"; still stopping on {', '.join(left)}" if left else "")))


@click.command("list", help="Show deployments and their state on each node.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@one_line_errors
def list_deployments(ctx: click.Context, as_json: bool) -> None:
    with state_and_store(ctx) as (state, store):
        rows = deployment_listing(state, store)
    if echoed_as_json_or_empty(rows, as_json, "no deployments"):
        return
    for row in rows:
        if "error" in row:
            click.echo(printable(f"{row['name']}: REFUSED: {row['error']}"))
            continue
        click.echo(printable(f"{row['name']} v{row['version']} {row['context_path']} ({row['mode']}: "
                             f"{row['app'] or 'app'} in {row['root']})"))
        if row["nodes"]:
            echo_table(("NODE", "STATE", "VERSION", "PORT", "CONTEXT STATE", "WEIGHT", "ERROR"),
                       ([node, info["state"], f"v{info.get('version')}", info.get("port"),
                         (info.get("balancer") or {}).get("state"), (info.get("balancer") or {}).get("weight"),
                         info.get("error")] for node, info in sorted(row["nodes"].items())),
                       right={"PORT", "WEIGHT"}, indent="  ")
