"""Owner-only folders and files, and the checks that keep other local users out of the store.

Everything under ``IMMUTANT_HOME`` (the store's AOF, the cluster secret, node data) is private to
the user running the nodes: folders this package creates are 0700, files 0600, and before a node
attaches to the store's unix socket it checks that the socket and its folder belong to that user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import StoreUnavailableError

#: Mode bits that let someone other than the owner in.
OTHERS = 0o077


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and any missing parents as 0700 folders; tighten ``path`` itself to 0700
    if it exists, is ours and is open to others (a folder made by an older release)."""
    folder = Path(path)
    missing: list[Path] = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for part in reversed(missing):
        try:
            part.mkdir(mode=0o700)
        except FileExistsError:
            pass  # another process made it a moment ago
    info = folder.lstat()
    if info.st_uid == os.geteuid() and stat.S_ISDIR(info.st_mode) and info.st_mode & OTHERS:
        folder.chmod(0o700)
    return folder


def check_private_dir(path: Path, what: str) -> None:
    """Refuse (one line, saying why) a folder that is a symlink, not ours, or open to others."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise StoreUnavailableError(f"refusing {what} {path}: it does not exist") from None
    me = os.geteuid()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StoreUnavailableError(f"refusing {what} {path}: it is not a plain folder (a symlink or a file)")
    if info.st_uid != me:
        raise StoreUnavailableError(
            f"refusing {what} {path}: it belongs to uid {info.st_uid}, not to you (uid {me}); "
            "another local user may be impersonating the store"
        )
    if info.st_mode & OTHERS:
        raise StoreUnavailableError(
            f"refusing {what} {path}: mode {stat.S_IMODE(info.st_mode):04o} lets other users in (want 0700)"
        )


def check_own_socket(path: Path) -> bool:
    """True if ``path`` is a unix socket of ours; False if there is nothing (or a stale non-socket
    of ours) there; refuses a socket or file that belongs to another user."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    me = os.geteuid()
    if info.st_uid != me:
        raise StoreUnavailableError(
            f"refusing to attach to the store socket {path}: it belongs to uid {info.st_uid}, not to you "
            f"(uid {me}); another local user may be impersonating the store"
        )
    return stat.S_ISSOCK(info.st_mode)


def tighten_files(folder: Path) -> None:
    """Make the files and subfolders of ``folder`` that we own owner-only (0600/0700):
    the AOF and pid files an older release left world-readable."""
    me = os.geteuid()
    for entry in folder.iterdir():
        info = entry.lstat()
        if info.st_uid != me or stat.S_ISLNK(info.st_mode):
            continue
        if stat.S_ISDIR(info.st_mode):
            if info.st_mode & OTHERS:
                entry.chmod(0o700)
            tighten_files(entry)
        elif stat.S_ISREG(info.st_mode) and info.st_mode & OTHERS:
            entry.chmod(0o600)
