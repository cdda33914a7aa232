"""Linux-only process calls, in one place, each with the portable answer beside it.

On Linux the kernel can SIGKILL a child when its parent dies (``PR_SET_PDEATHSIG``) and ``/proc``
tells a zombie from a live process; elsewhere the lifeline pipe and ``kill(pid, 0)`` do the job.
On Linux a lease holder also holds an ``flock`` on its own file in ``/dev/shm`` for its life: a
process of the same machine that can take that lock has the kernel's proof that the holder and
every child it forked are gone (:func:`lock_abandoned`). A pid is no such proof: machines restored
from one memory snapshot share boot ids and pid namespace inodes, and a forked child can outlive
its parent. Elsewhere nothing is proven, and leases wait for their TTL.
``IMMUTANT_PORTABLE=1`` turns the Linux extras off so the portable path can be tested on Linux.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import signal
import stat
import sys
import threading
import uuid
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


#: Where a lease-holding process keeps its lock file: memory-backed, one per kernel (and per mount
#: namespace), so every process of the host that could contend for its leases sees it.
LOCK_DIR = Path("/dev/shm")
#: The only names a lock file can have: store data names one, so nothing else is ever opened.
LOCK_NAME = re.compile(r"flask-immutant-[0-9a-f]{32}\.lock")
#: (pid, fd, name, (st_dev, st_ino)) of this process's lock file
_own_lock: tuple[int, int, str, tuple[int, int]] | None = None
_own_lock_users: set[int] = set()  # ids of the objects whose records name it (lease managers, membership)
_own_lock_guard = threading.Lock()


def _forget_own_lock_in_child() -> None:
    """A forked child gets a new guard (another thread may have held the parent's at the fork) and
    none of the parent's users: its own leases need its own lock file."""
    global _own_lock_guard, _own_lock
    _own_lock_guard = threading.Lock()
    _own_lock = None
    _own_lock_users.clear()


os.register_at_fork(after_in_child=_forget_own_lock_in_child)


def own_lock(user: object) -> str | None:
    """Linux: the name of this process's lock file in :data:`LOCK_DIR`, created on the first call
    and held (``flock`` exclusive) until the process and every child it forked are gone, which the
    kernel then proves to any process that can take the lock (:func:`lock_abandoned`); ``user``
    (whose records name it) keeps it until :func:`drop_own_lock`. None elsewhere, in portable
    mode, or when it cannot be created: then nothing is proven."""
    global _own_lock
    if not linux_extras():
        return None
    with _own_lock_guard:
        if _own_lock is not None and _own_lock[0] != os.getpid():
            _own_lock = None  # a child os.fork did not tell (a raw fork): the parent's stays open, held
            _own_lock_users.clear()
        _own_lock_users.add(id(user))
        if _own_lock is not None:
            return _own_lock[2]
        for _ in range(3):  # another name when a sweep took a new file before its flock
            name = f"flask-immutant-{uuid.uuid4().hex}.lock"
            try:
                fd = os.open(LOCK_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o600)
            except FileExistsError:
                continue
            except OSError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not os.path.samestat(os.stat(LOCK_DIR / name, follow_symlinks=False), os.fstat(fd)):
                    raise FileNotFoundError(name)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(LOCK_DIR / name)  # ours, never named anywhere: no use to anyone
                os.close(fd)
                continue
            info = os.fstat(fd)
            _own_lock = (os.getpid(), fd, name, (info.st_dev, info.st_ino))
            return name
    return None


def drop_own_lock(user: object) -> None:
    """``user`` stopped gracefully (released what it held): once no user is left, unlink and
    close this process's lock file, so it proves nothing more."""
    global _own_lock
    with _own_lock_guard:
        _own_lock_users.discard(id(user))
        if _own_lock is None or _own_lock[0] != os.getpid() or _own_lock_users:
            return
        _, fd, name, identity = _own_lock
        _own_lock = None
        with contextlib.suppress(OSError):
            path_info = os.stat(LOCK_DIR / name, follow_symlinks=False)
            if (path_info.st_dev, path_info.st_ino) == identity:  # ours, not a file made at its name since
                os.unlink(LOCK_DIR / name)
        with contextlib.suppress(OSError):
            fd_info = os.fstat(fd)
            if (fd_info.st_dev, fd_info.st_ino) == identity:  # not a number reused after a closerange
                os.close(fd)


def _take_lock(name: object, operation: int) -> int | None:
    """A descriptor of lock file ``name`` locked with ``operation``, or None: a malformed name, no
    such file, not a regular file owned by this user and private to it, or locked by another."""
    if not linux_extras() or not isinstance(name, str) or not LOCK_NAME.fullmatch(name):
        return None
    try:
        fd = os.open(LOCK_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            # Still the file the name gives: not one unlinked (and perhaps replaced) after we opened it.
            if os.path.samestat(os.stat(LOCK_DIR / name, follow_symlinks=False), os.fstat(fd)):
                return fd
    except OSError:
        pass
    os.close(fd)
    return None


def pid_namespace() -> str | None:
    """This process's pid namespace (``st_dev:st_ino`` of ``/proc/self/ns/pid``), or None where it
    cannot be read: a pid proves something only to a process of the same namespace."""
    if not linux_extras():
        return None
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None  # a /proc of another pid namespace: its states are not of our pids
        info = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{info.st_dev}:{info.st_ino}"


#: The largest pid Linux hands out (``pid_max`` can be at most 2**22); a larger one in a record
#: proves nothing (and would overflow ``kill``).
PID_MAX = 2**22


def pid_gone(pid: object, pidns: object) -> bool:
    """True only if ``pid`` of pid namespace ``pidns`` (both read from the store: any value) names
    no live process here: the namespace is ours and the pid is free or a zombie. False means "not
    proven": another or an unknown namespace, no permission, or a live process (a reused pid too)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= PID_MAX:
        return False
    here = pid_namespace()
    if here is None or pidns != here:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return process_state(pid) == "Z"


def lock_abandoned(name: object) -> bool:
    """True only if the lock file ``name`` (read from the store: any value) exists and nobody holds
    it: every descriptor of its creator's open file is closed, so the creator and every child that
    inherited it are gone (a zombie has closed its files; a stopped or cut-off process has not).

    False means "not proven", never "alive": a malformed name, no such file (another host, a clone
    of this machine, portable mode), another user's, or held (a shared lock, so provers never
    make each other's proof fail)."""
    fd = _take_lock(name, fcntl.LOCK_SH)
    if fd is None:
        return False
    os.close(fd)
    return True


def holder_gone(lock: object, pid: object, pidns: object) -> bool:
    """The proof that a holder (of a lease, or of a node name) is dead, from what its record says
    (any values): its lock file is abandoned AND its pid names no live process of our pid namespace.
    Either alone is not enough: the holder's own code may close descriptors it did not open (the
    lock goes while it lives), and a pid proves nothing to another namespace or a memory-snapshot
    clone. A reused pid makes the proof fail: the TTL then applies, the safe side."""
    return pid_gone(pid, pidns) and lock_abandoned(lock)


def remove_abandoned_lock(name: object) -> bool:
    """Unlink lock file ``name`` while holding it exclusively, if nobody else holds it (its
    creator is gone); whether it was removed."""
    fd = _take_lock(name, fcntl.LOCK_EX)  # which checked that the name still gives the file it locked
    if fd is None:
        return False
    try:
        os.unlink(LOCK_DIR / str(name))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def abandoned_locks() -> list[str]:
    """The lock files of :data:`LOCK_DIR` whose creators are gone (:func:`lock_abandoned`)."""
    if not linux_extras():
        return []
    try:
        names = os.listdir(LOCK_DIR)
    except OSError:
        return []
    return [name for name in names if LOCK_NAME.fullmatch(name) and lock_abandoned(name)]


def sweep_abandoned_locks(delay: float) -> threading.Timer | None:
    """Unlink, ``delay`` seconds from now, the lock files whose creators are gone already (a node's
    start: holders that crashed with nobody left to prove it). A holder that dies later keeps its
    file: it may still have to prove that death. The timer, or None when there is nothing to do."""
    stale = abandoned_locks()
    if not stale:
        return None
    timer = threading.Timer(delay, lambda: [remove_abandoned_lock(name) for name in stale])
    timer.daemon = True
    timer.name = "lock-file-sweep"
    timer.start()
    return timer
