"""mod_cluster's model on the cluster store: contexts, their states and load factors, and the
balancers (HAProxy, embedded) that route to them."""

from __future__ import annotations

from .registry import STATES, Backend, Context, contexts, routing_table, set_control, set_weight

__all__ = ["STATES", "Backend", "Context", "contexts", "routing_table", "set_control", "set_weight"]
