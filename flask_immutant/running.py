"""``current()``: what this thread is running for, whichever feature runs it.

One question for every feature, so user code shared by a listener, a daemon and a job can ask
it without knowing which one called it. Features that were never imported cannot be running,
so their modules are looked up, not imported (importing messaging would load Dramatiq).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["current"]

#: (module, function) pairs asked in turn; the first non-``None`` answer wins.
_SOURCES = (
    ("flask_immutant.messaging.engine", "current_message"),
    ("flask_immutant.daemons.runner", "current"),
    ("flask_immutant.jobs.driver", "current"),
)


def current() -> Any:
    """The :class:`~flask_immutant.messaging.Message` being handled, the
    :class:`~flask_immutant.daemons.DaemonContext` of the daemon or the
    :class:`~flask_immutant.jobs.Fire` of the job running on this thread; ``None`` elsewhere."""
    for module_name, function in _SOURCES:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        found = getattr(module, function)()
        if found is not None:
            return found
    return None
