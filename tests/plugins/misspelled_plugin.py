"""Test plugin: implements ``immutant_stauts``, a hook that does not exist."""

from __future__ import annotations

from typing import Any

from flask_immutant import hookimpl


@hookimpl
def immutant_stauts(state: Any) -> dict[str, Any]:
    return {"never": "called"}
