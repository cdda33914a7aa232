"""Every hook a flask-immutant plugin can implement, grouped by lifecycle.

A plugin is a module (or object) with functions decorated ``@hookimpl`` whose names are the
specs below. Built-in features are plugins too (see :data:`flask_immutant.plugins.DEFAULT_PLUGINS`)
and implement their hooks with ``trylast=True`` so a user's plugin can run first or override.

Hooks pass the small read-only views of :mod:`flask_immutant.protocols` (``StateView``,
``RuntimeView``, ``NodeView``): the stable surface a plugin may rely on (docs/plugins.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click
    import redis
    from flask import Flask

    from .cluster.membership import Member
    from .protocols import NodeView, RuntimeView, StateView
    from .settings import Setting

PROJECT = "flask_immutant"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Configuration ------------------------------------------------------------------------


@hookspec
def immutant_settings() -> list[Setting]:
    """Declare the ``IMMUTANT_*`` settings this plugin owns.

    Called once per plugin manager, before any value is resolved. Returns a list of
    :class:`~flask_immutant.settings.Setting` rows; all results are merged into one table, and a
    key declared twice is an error. A feature's on/off flag is one of its rows.
    """


# --- App ----------------------------------------------------------------------------------


@hookspec
def immutant_init_app(app: Flask, state: StateView) -> None:
    """``ImmutantExtension.init_app`` has validated the settings of ``app``.

    Called once per app in every process that imports it (node supervisor, app runtime, CLI).
    Must not start threads or connect to anything: that belongs in ``immutant_runtime_started``.
    """


# --- App runtime (the child process serving one app) ---------------------------------------


@hookspec
def immutant_runtime_started(runtime: RuntimeView) -> None:
    """The app runtime is serving HTTP; start background work (workers, daemons, jobs).

    ``runtime.app`` is the Flask app and ``runtime.state`` its state.
    """


@hookspec
def immutant_runtime_stopping(runtime: RuntimeView) -> None:
    """The app runtime is shutting down; stop background work and release leases, by
    ``runtime.stop_deadline`` (its drain's end: ``IMMUTANT_SHUTDOWN_TIMEOUT`` less the margin the
    runtime keeps to exit). The implementations run at the same time, each in its own thread."""


# --- Node (the supervisor process of ``flask immutant run``) --------------------------------


@hookspec
def immutant_node_starting(node: NodeView) -> None:
    """The node has its identity and store but has not joined the cluster yet."""


@hookspec
def immutant_node_started(node: NodeView) -> None:
    """The node has joined the cluster and started the app runtimes it was given.

    A node with no app waits here for deployments; the deploy feature watches from this hook.
    """


@hookspec
def immutant_node_stopping(node: NodeView) -> None:
    """The node is shutting down gracefully, before it leaves the cluster."""


# --- Membership ---------------------------------------------------------------------------


@hookspec
def immutant_member_joined(node: NodeView, member: Member) -> None:
    """``member`` joined the cluster, as seen from ``node``.

    Called on every node, in its membership thread, once per join; on start a node sees every
    member already present (itself included) join. Keep it quick.
    """


@hookspec
def immutant_member_left(node: NodeView, member: Member, reason: str) -> None:
    """``member`` left the cluster, as seen from ``node``.

    ``reason`` is ``"left"`` for a graceful leave (seen at once) or ``"timeout"`` when its
    heartbeats stopped for ``IMMUTANT_FAILURE_TIMEOUT`` (a crash).
    """


# --- CLI ----------------------------------------------------------------------------------


@hookspec
def immutant_register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``flask immutant`` group.

    Called once, the first time the group lists or looks up its commands, with the plugins
    from ``DEFAULT_PLUGINS``, the ``flask_immutant`` entry points and ``IMMUTANT_PLUGINS`` from
    the environment.
    """


# --- Status -------------------------------------------------------------------------------


@hookspec
def immutant_status(state: StateView, store: redis.Redis) -> dict[str, Any] | None:
    """Contribute sections to ``flask immutant status --json``.

    ``store`` is one client of the cluster store, opened for the whole document (it never starts
    the embedded store): read through it rather than opening another. Returns a mapping of
    section name to JSON-serialisable data, or ``None``. Sections from all plugins are merged
    into the status document; two plugins claiming one section is an error.
    """
