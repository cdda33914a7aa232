"""The supervisor's classes give plugins what the hooks promise: mypy checks here that ``Node``,
``AppRuntime`` and ``ImmutantState`` satisfy the views of :mod:`flask_immutant.protocols`
(hooks are called through pluggy, which mypy cannot see through). Nothing imports this module."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..protocols import NodeView, RuntimeView, StateView
    from ..state import ImmutantState
    from .node import Node
    from .runtime import AppRuntime

    def node_view(node: Node) -> NodeView:
        return node

    def runtime_view(runtime: AppRuntime) -> RuntimeView:
        return runtime

    def state_view(state: ImmutantState) -> StateView:
        return state
