"""Test plugin: a plain module plugin, plus an object plugin for the ``module:attr`` form."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask_immutant import hookimpl

if TYPE_CHECKING:
    from flask_immutant import ImmutantState


@hookimpl
def immutant_status(state: ImmutantState) -> dict[str, Any]:
    return {"sample": {"cluster": state.settings["IMMUTANT_CLUSTER"]}}


class ObjectPlugin:
    """Hooks as methods: loaded with ``IMMUTANT_PLUGINS=sample_plugin:object_plugin``."""

    @hookimpl
    def immutant_status(self, state: ImmutantState) -> dict[str, Any]:
        return {"sample_object": {"cluster": state.settings["IMMUTANT_CLUSTER"]}}


object_plugin = ObjectPlugin()
