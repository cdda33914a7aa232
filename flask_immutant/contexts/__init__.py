"""Contexts, as mod_cluster has them: what each app runtime serves (node, path, address, state, load
factor). The runtime publishes its own while it serves (:mod:`.plugin`), ``flask immutant ctl``
controls them, the balancers (:mod:`flask_immutant.balancer`) route to them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..moved import lazy_or_moved

if TYPE_CHECKING:
    from .registry import STATES, Context, Server, contexts, routing_table, set_control, set_weight

#: Imported on first use, so that loading the plugin (every CLI command does) stays light.
_LAZY = dict.fromkeys(("STATES", "Context", "Server", "contexts", "routing_table", "set_control", "set_weight"),
                      ".registry")


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, {})


__all__ = ["STATES", "Context", "Server", "contexts", "routing_table", "set_control", "set_weight"]
