"""The runtime template (placeholder until the template lands): no template, always a fresh interpreter."""

from __future__ import annotations

from typing import Any


def fork_runtime(app: str, root: str, env: dict[str, str], fds: tuple[int, ...]) -> Any:
    return None
