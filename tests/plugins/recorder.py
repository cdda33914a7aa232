"""Test plugin: append every hook call it receives to the JSON-lines file named by ``RECORDER_FILE``.

Loaded with ``IMMUTANT_PLUGINS=recorder`` and ``tests/plugins`` on ``PYTHONPATH``. Each line is
``{"hook": ..., "pid": ..., **key arguments}``; node, runtime and CLI processes all append to
the one file (small ``O_APPEND`` writes do not interleave). Without ``RECORDER_FILE`` it records
nothing, so it can be registered in-process too.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from flask_immutant import hookimpl

if TYPE_CHECKING:
    import click
    from flask import Flask

    from flask_immutant import ImmutantState, Setting
    from flask_immutant.cluster import Member
    from flask_immutant.server.node import Node
    from flask_immutant.server.runtime import AppRuntime

#: The environment variable naming the file to append to.
ENV_VAR = "RECORDER_FILE"


def record(hook: str, **fields: Any) -> None:
    target = os.environ.get(ENV_VAR)
    if not target:
        return
    line = json.dumps({"hook": hook, "pid": os.getpid(), **fields}, sort_keys=True) + "\n"
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The calls recorded so far in ``path`` (complete lines only)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


@hookimpl
def immutant_settings() -> list[Setting]:
    record("immutant_settings")
    return []


@hookimpl
def immutant_init_app(app: Flask, state: ImmutantState) -> None:
    record("immutant_init_app", app=app.name, cluster=state.settings["IMMUTANT_CLUSTER"])


@hookimpl
def immutant_runtime_started(runtime: AppRuntime) -> None:
    record("immutant_runtime_started", app=runtime.app.name, node=os.environ.get("IMMUTANT_NODE_NAME"))


@hookimpl
def immutant_runtime_stopping(runtime: AppRuntime) -> None:
    record("immutant_runtime_stopping", app=runtime.app.name, node=os.environ.get("IMMUTANT_NODE_NAME"))


@hookimpl
def immutant_node_starting(node: Node) -> None:
    record("immutant_node_starting", node=node.identity.name)


@hookimpl
def immutant_node_started(node: Node) -> None:
    record("immutant_node_started", node=node.identity.name)


@hookimpl
def immutant_node_stopping(node: Node) -> None:
    record("immutant_node_stopping", node=node.identity.name)


@hookimpl
def immutant_member_joined(node: Node, member: Member) -> None:
    record("immutant_member_joined", node=node.identity.name, member=member.name)


@hookimpl
def immutant_member_left(node: Node, member: Member, reason: str) -> None:
    record("immutant_member_left", node=node.identity.name, member=member.name, reason=reason)


@hookimpl
def immutant_register_commands(cli: click.Group) -> None:
    record("immutant_register_commands", group=cli.name)


@hookimpl
def immutant_status(state: ImmutantState) -> dict[str, Any] | None:
    record("immutant_status", cluster=state.settings["IMMUTANT_CLUSTER"])
    return None
