"""Deprecated: the old name of :mod:`flask_immutant.jobs` (one module since issue 12).

``from flask_immutant import scheduling`` keeps working, with a ``DeprecationWarning`` on each name
used; ``scheduling.fire`` stays resolvable for schedules stored by older versions.
"""

from __future__ import annotations

import warnings

from . import jobs

__all__ = jobs.__all__


def __getattr__(name: str) -> object:
    if name in jobs.MOVED:
        from .moved import moved_attribute

        return moved_attribute(__name__, name, jobs.MOVED)
    value = getattr(jobs, name)
    warnings.warn(f"flask_immutant.scheduling is now flask_immutant.jobs: use jobs.{name}", DeprecationWarning,
                  stacklevel=2)
    return value
