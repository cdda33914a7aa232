"""Test plugin: two object plugins that both claim the ``clash`` status section."""

from __future__ import annotations

from typing import Any

from flask_immutant import hookimpl


class Claimant:
    def __init__(self, who: str) -> None:
        self.who = who

    @hookimpl
    def immutant_status(self, state: Any) -> dict[str, Any]:
        return {"clash": {"from": self.who}}


first = Claimant("first")
second = Claimant("second")
