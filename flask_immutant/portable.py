"""Linux-only process calls, in one place, each with the portable answer beside it.

On Linux the kernel can SIGKILL a child when its parent dies (``PR_SET_PDEATHSIG``) and ``/proc``
tells a zombie from a live process; elsewhere the lifeline pipe and ``kill(pid, 0)`` do the job.
``IMMUTANT_PORTABLE=1`` turns the Linux extras off so the portable path can be tested on Linux.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

#: Environment variable that forces the portable code path (read here and nowhere else).
PORTABLE_ENV = "IMMUTANT_PORTABLE"
PR_SET_PDEATHSIG = 1


def linux_extras() -> bool:
    """Whether Linux-only calls may be used: on Linux, unless ``IMMUTANT_PORTABLE=1``."""
    return sys.platform.startswith("linux") and os.environ.get(PORTABLE_ENV, "") not in ("1", "true", "yes")


def set_parent_death_signal() -> None:
    """Linux: the kernel SIGKILLs this process when its parent dies (a ``preexec_fn``). A no-op
    elsewhere: the lifeline pipe, whose EOF ends the child, is the mechanism on every platform."""
    if not linux_extras():
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def process_state(pid: int) -> str | None:
    """The one-letter state from ``/proc/PID/stat`` ("Z" for a zombie), or None without /proc."""
    if not linux_extras():
        return None
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def process_cmdline(pid: int) -> bytes | None:
    """The command line of ``pid`` from ``/proc``, or None where there is no /proc."""
    if not linux_extras():
        return None
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
