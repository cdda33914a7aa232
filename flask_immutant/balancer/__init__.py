"""The balancers that route to the cluster's contexts (:mod:`flask_immutant.contexts`): the embedded
one and the HAProxy reconciler. The context names are re-exported here for older imports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..moved import lazy_or_moved

if TYPE_CHECKING:
    from ..contexts.registry import STATES, Context, Server, contexts, routing_table, set_control, set_weight

#: Imported on first use, so that loading the balancer plugins (every command does) stays light.
_LAZY = dict.fromkeys(("STATES", "Context", "Server", "contexts", "routing_table", "set_control", "set_weight"),
                      "..contexts.registry")


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, {})

__all__ = ["STATES", "Context", "Server", "contexts", "routing_table", "set_control", "set_weight"]
