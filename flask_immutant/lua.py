"""The one loader for the Lua scripts. Each script sits beside the module that runs it and is named
for it: ``cluster/lease_acquire.lua`` is run by ``cluster/lease.py`` only. Read once, registered per
client."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any


@cache
def source(path: str) -> str:
    """``path`` is relative to the package, without ``.lua``: ``"cluster/lease_acquire"``."""
    return resources.files(__package__ or "flask_immutant").joinpath(f"{path}.lua").read_text(encoding="utf-8")


def script(client: Any, path: str) -> Any:
    """A redis-py ``Script`` for ``path.lua`` (EVALSHA with a transparent EVAL fallback)."""
    return client.register_script(source(path))
