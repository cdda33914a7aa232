"""The stable surface hooks hand to plugins: what a plugin may use of an app's state, of an app
runtime and of a node, as small read-only Protocols (docs/plugins.md).

Hooks are typed against these, not against the supervisor's ``Node`` and ``AppRuntime`` or the
extension's ``ImmutantState``, so a plugin depends on a few promised attributes, the supervisor can
change behind them, and this module imports nothing of the package at run time: a leaf, which is
what keeps the hook specifications out of import cycles (tests/test_imports.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    import redis
    from flask import Flask

    from .cluster.identity import NodeIdentity
    from .cluster.membership import Membership
    from .keys import Keys
    from .settings import Settings

T = TypeVar("T")


class Slot(Generic[T]):
    """A typed place for one feature's per-app object in the app's state: the feature declares
    ``REGISTRY: Slot[DaemonRegistry] = Slot("daemons")`` and ``state.get(REGISTRY)`` is a
    ``DaemonRegistry | None``. Third-party plugins declare their own the same way (the name is the
    key, so pick one no other plugin uses)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"


class StateView(Protocol):
    """What a plugin may use of an app's state (``ImmutantState``), as hooks pass it."""

    @property
    def settings(self) -> Settings: ...

    @property
    def keys(self) -> Keys: ...

    @property
    def store(self) -> redis.Redis: ...

    @property
    def node_name(self) -> str: ...

    @property
    def app_id(self) -> str | None: ...

    @property
    def runtime(self) -> RuntimeView | None: ...

    def get(self, slot: Slot[T]) -> T | None: ...

    def put(self, slot: Slot[T], value: T) -> T: ...

    def pop(self, slot: Slot[T]) -> T | None: ...


class RuntimeView(Protocol):
    """What a plugin may use of an app runtime (the process serving one app)."""

    @property
    def app(self) -> Flask: ...

    @property
    def state(self) -> StateView: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def context_path(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def active_requests(self) -> int:
        """Requests being served now (the contexts feature's load factor)."""

    @property
    def stopping(self) -> threading.Event:
        """Set once the runtime starts shutting down."""

    @property
    def stop_deadline(self) -> float | None:
        """``time.monotonic()`` by which its ``immutant_runtime_stopping`` hooks must be done (the
        runtime's drain ends then, and it exits); ``None`` until it stops."""

    def spawn(self, name: str, target: Callable[[], Any]) -> threading.Thread:
        """Run ``target`` in a daemon thread inside the app context."""


class NodeView(Protocol):
    """What a plugin may use of a node (the supervisor process of ``flask immutant run``)."""

    @property
    def state(self) -> StateView: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def identity(self) -> NodeIdentity: ...

    @property
    def store(self) -> redis.Redis | None:
        """The node's store client, set once it has one (from ``immutant_node_starting`` on)."""

    @property
    def membership(self) -> Membership | None:
        """The live membership, once the node has joined (from ``immutant_node_started`` on)."""

    @property
    def stop_requested(self) -> threading.Event:
        """Set when the node was asked to stop: a plugin's loop stops with it."""
