"""Test plugin: implements a real hook but asks for an argument the hook does not pass."""

from __future__ import annotations

from typing import Any

from flask_immutant import hookimpl


@hookimpl
def immutant_member_joined(node: Any, member: Any, cluster: Any) -> None:
    raise AssertionError("never called: `cluster` is not an argument of immutant_member_joined")
