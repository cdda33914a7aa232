"""Contexts, as mod_cluster has them: what each app runtime serves (node, path, address, state, load
factor). The runtime publishes its own while it serves (:mod:`.plugin`), ``flask immutant ctl``
controls them, the balancers (:mod:`flask_immutant.balancer`) route to them."""

from __future__ import annotations

from .registry import STATES, Context, Server, contexts, routing_table, set_control, set_weight

__all__ = ["STATES", "Context", "Server", "contexts", "routing_table", "set_control", "set_weight"]
