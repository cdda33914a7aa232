"""Bytecode a runtime must not load: a ``.pyc`` written before its source last changed.

A timestamp ``.pyc`` records its source's mtime in whole seconds and its size, and Python loads
it when both match. An app file rewritten within the second its ``.pyc`` was written, at the same
size (``VERSION = 5`` to ``VERSION = 6``), therefore ran the old code while the deployment said
the new version was deployed. The file times tell: a ``.pyc`` older than its source is stale
whatever its header says, so a runtime drops those of its app folder before importing the app.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("flask_immutant.runtime")

#: Folders not walked: other people's code (virtualenvs, installed packages) and hidden folders.
SKIPPED = frozenset({"site-packages", "dist-packages", "node_modules"})
#: Folders walked at most: an app folder, not a whole disk.
MAX_FOLDERS = 2_000


def drop_stale_bytecode(root: str | os.PathLike[str]) -> int:
    """Delete the ``.pyc`` files under ``root`` older than their source; returns how many."""
    tag = sys.implementation.cache_tag
    if tag is None:
        return 0
    dropped = walked = 0
    for folder, subfolders, _files in os.walk(root):
        walked += 1
        if walked > MAX_FOLDERS:
            break
        subfolders[:] = [name for name in subfolders if _walkable(folder, name)]
        if os.path.basename(folder) != "__pycache__":
            continue
        for entry in os.scandir(folder):
            stem, _, rest = entry.name.partition(".")
            if rest not in (f"{tag}.pyc", f"{tag}.opt-1.pyc", f"{tag}.opt-2.pyc"):
                continue
            source = Path(folder).parent / f"{stem}.py"
            try:
                if entry.stat().st_mtime_ns < source.stat().st_mtime_ns:
                    os.unlink(entry.path)
                    dropped += 1
            except FileNotFoundError:
                continue  # no source (a sourceless import is the app's business) or already gone
            except OSError as exc:  # a read-only folder: Python would load it; say so
                log.warning("stale bytecode %s could not be removed (%s): the app may run older code",
                            entry.path, exc)
    return dropped


def _walkable(folder: str, name: str) -> bool:
    if name.startswith(".") or name in SKIPPED:
        return False
    return name == "__pycache__" or not os.path.exists(os.path.join(folder, name, "pyvenv.cfg"))
