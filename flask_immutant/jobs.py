"""``from flask_immutant import jobs``: Immutant's name for :mod:`flask_immutant.scheduling`."""

from __future__ import annotations

from .scheduling import Fire, JobSpec, current, schedule, stop, unschedule

__all__ = ["Fire", "JobSpec", "current", "schedule", "stop", "unschedule"]
