"""``from flask_immutant import jobs``: Immutant's name for :mod:`flask_immutant.scheduling`."""

from __future__ import annotations

from .moved import moved_attribute
from .scheduling import MOVED, Fire, current, schedule, stop, unschedule

__all__ = ["Fire", "current", "schedule", "stop", "unschedule"]


def __getattr__(name: str) -> object:
    return moved_attribute(__name__, name, MOVED)
