"""Test plugin: a feature switched by its own flag setting, ``IMMUTANT_FLAGGED``."""

from __future__ import annotations

from typing import Any

from flask_immutant import Setting, hookimpl
from flask_immutant.settings import to_bool

#: The setting that switches this plugin; when False the plugin is unregistered.
FLAG = "IMMUTANT_FLAGGED"


@hookimpl
def immutant_settings() -> list[Setting]:
    return [Setting(FLAG, True, to_bool, "Turn the flagged test feature on.", "bool", env=True)]


@hookimpl
def immutant_status(state: Any) -> dict[str, Any]:
    return {"flagged": {"on": True}}
