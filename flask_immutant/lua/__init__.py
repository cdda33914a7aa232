"""Lua scripts, one file each, loaded by name so they are read once and registered per client."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any


@cache
def source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def script(client: Any, name: str) -> Any:
    """A redis-py ``Script`` for ``name.lua`` (EVALSHA with a transparent EVAL fallback)."""
    return client.register_script(source(name))
