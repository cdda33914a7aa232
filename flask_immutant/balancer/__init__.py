"""The balancers that route to the cluster's contexts (:mod:`flask_immutant.contexts`): the embedded
one and the HAProxy reconciler. The context names are re-exported here for older imports."""

from __future__ import annotations

from ..contexts.registry import STATES, Context, Server, contexts, routing_table, set_control, set_weight

__all__ = ["STATES", "Context", "Server", "contexts", "routing_table", "set_control", "set_weight"]
