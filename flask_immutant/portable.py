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


def process_host() -> str | None:
    """Linux: who can judge this process's pids: ``boot_id/pid-namespace/time-namespace``, the
    same string exactly for processes that share one kernel boot, one pid namespace (so a pid names
    the same process for both) and one time namespace (so both read the same start times). None
    elsewhere, when anything is unreadable, or when ``/proc`` is another pid namespace's.

    A host name is not enough: containers with host networking share it, not their pids."""
    if not linux_extras():
        return None
    try:
        if int(Path("/proc/self/stat").read_text().split(None, 1)[0]) != os.getpid():
            return None  # a /proc mounted from another pid namespace
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.stat("/proc/self/ns/pid")
        try:
            time_ns = os.stat("/proc/self/ns/time")
            timens = f"{time_ns.st_dev}:{time_ns.st_ino}"
        except FileNotFoundError:  # a kernel before 5.6 has no time namespaces
            timens = "-"
    except (OSError, ValueError, IndexError):
        return None
    if not boot:
        return None
    return f"{boot}/{pid_ns.st_dev}:{pid_ns.st_ino}/{timens}"


def process_start(pid: int) -> int | None:
    """Linux: when ``pid`` started, in clock ticks since boot (field 22 of ``/proc/PID/stat``):
    with the pid, it names one process for the whole boot, even once the pid is reused."""
    if not linux_extras():
        return None
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_dead(host: object, pid: object, start: object) -> bool:
    """True only if the process ``pid`` that started at ``start`` on ``host`` (:func:`process_host`,
    :func:`process_start`, as it recorded them) is provably gone: this process shares its kernel,
    pid and time namespaces, and the pid is free, names a zombie, or names a later process.

    False means "not proven", never "alive": elsewhere, in portable mode, across hosts or
    namespaces, on a record without them, or when ``/proc`` cannot be read."""
    if not (isinstance(host, str) and isinstance(pid, int) and isinstance(start, int)) or pid <= 0:
        return False
    if host != process_host():
        return False
    try:
        os.kill(pid, 0)  # in our own pid namespace (process_host checked it): no such pid is proof
    except ProcessLookupError:
        return True
    except OSError:
        pass  # it exists (EPERM: another user's)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        threads = [entry.name for entry in Path(f"/proc/{pid}/task").iterdir()]
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[19]) != start:
            return True  # the pid was freed and reused: the recorded process was reaped
        # A zombie leader may still have live threads: every thread must be dead.
        states = [Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[-1].split()[0] for tid in threads]
    except FileNotFoundError:
        return _no_such_process(pid)  # it went while we read
    except (OSError, ValueError, IndexError):
        return False
    return bool(states) and all(state in ("Z", "X") for state in states)


def _no_such_process(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
