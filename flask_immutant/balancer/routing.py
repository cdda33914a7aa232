"""The balancers' one state machine: which backend serves a request.

Pure functions of the routing table (:func:`~flask_immutant.contexts.registry.routing_table`),
the request's path and its route cookie, so the embedded balancer, the HAProxy reconciler's
documentation and the tests agree on one set of rules:

- the longest context path that contains the request path decides the backends;
- a route cookie naming an ENABLED or DISABLED backend keeps the request there (sticky session);
- new sessions go to ENABLED backends only, by weighted random choice on their load factor;
- a DISABLED backend (drain) gets only requests whose route cookie names it;
- a STOPPED backend gets nothing: a request bound to it goes elsewhere, and the replicated
  session is there too;
- a backend whose connection just failed is left out for this request (and, by the embedded
  balancer, for a short quarantine), so an idempotent request is retried on another.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from ..contexts.registry import Server

#: The route cookie: its value names the node a session is bound to.
ROUTE_COOKIE = "IMMUTANT_ROUTE"
#: Methods that may be sent again to another backend when connecting to one failed.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: States a route cookie may keep a request on.
STICKY_STATES = frozenset({"ENABLED", "DISABLED"})


@dataclass(frozen=True)
class Decision:
    """Where one request goes: a backend, or why none can serve it (``status`` 503 or 404)."""

    context_path: str | None
    backend: Server | None
    sticky: bool = False
    reason: str = ""

    @property
    def set_route(self) -> str | None:
        """The route cookie value to send back, when the request's cookie does not already name it."""
        return None if self.backend is None or self.sticky else self.backend.node


def match_context(context_paths: Collection[str], path: str) -> str | None:
    """The longest context path containing ``path`` (``/shop`` holds ``/shop`` and ``/shop/x``,
    not ``/shopping``); ``/`` holds every path."""
    best: str | None = None
    for candidate in context_paths:
        root = candidate.rstrip("/")
        if (not root or path == root or path.startswith(root + "/")) and (best is None or len(candidate) > len(best)):
            best = candidate
    return best


def choose(backends: Sequence[Server], route: str | None = None, exclude: Collection[str] = (),
           rand: Callable[[], float] = random.random) -> tuple[Server | None, bool]:
    """A backend for one request, and whether it is the sticky one its route cookie names.

    ``exclude`` holds node names that must not be used now (their connection failed).
    """
    candidates = [b for b in backends if b.node not in exclude]
    if route:
        for backend in candidates:
            if backend.node == route and backend.state in STICKY_STATES:
                return backend, True
    enabled = [b for b in candidates if b.state == "ENABLED" and b.weight > 0]
    if not enabled:
        return None, False
    total = sum(b.weight for b in enabled)
    point = rand() * total
    for backend in enabled:
        point -= backend.weight
        if point < 0:
            return backend, False
    return enabled[-1], False


def decide(table: Mapping[str, Sequence[Server]], path: str, route: str | None = None,
           exclude: Collection[str] = (), rand: Callable[[], float] = random.random) -> Decision:
    """Route one request: its context, then its backend (see the module's rules)."""
    context_path = match_context(table, path)
    if context_path is None:
        return Decision(None, None, reason=f"no app is deployed at a context path containing {path}")
    backends = table[context_path]
    backend, sticky = choose(backends, route, exclude, rand)
    if backend is not None:
        return Decision(context_path, backend, sticky)
    return Decision(context_path, None, reason=_why_none(context_path, backends, exclude))


def _why_none(context_path: str, backends: Sequence[Server], exclude: Collection[str]) -> str:
    if not backends:
        return f"no node serves {context_path}"
    states = ", ".join(f"{b.node} {'unreachable' if b.node in exclude else b.state}"
                       + (" weight 0" if b.state == "ENABLED" and b.weight <= 0 and b.node not in exclude else "")
                       for b in backends)
    return f"no node can take a new session at {context_path} ({states})"
