"""Where a dead process's counters and histograms go: one archive file per kind in the node's
metrics folder, which prometheus_client's multi-process collector reads like any process's file.

This writes prometheus_client's file format (``MmapedDict``, ``KIND_ID.db``), which is not its
public API: ``tests/test_metrics.py::test_folding_dead_processes_keeps_every_value_contract``
pins it to the installed version (a scrape reads the same values before and after folding).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

#: The kinds whose values outlive their process (gauges of the modes we use do not).
KINDS = ("counter", "histogram")
#: The archive's id in place of a pid: prometheus_client reads ``counter_archive.db`` as a counter file.
ARCHIVE = "archive"


def name_of(kind: str) -> str:
    return f"{kind}_{ARCHIVE}.db"


def fold(dead: Path, into: Path) -> None:
    """Add every value of ``dead`` (a gone process's file) to ``into``, then delete ``dead``.
    The file is renamed first, so a scrape never reads it twice; a crash between the rename and
    the delete loses that process's values rather than counting them twice. Caller holds
    :func:`flock`."""
    from prometheus_client.mmap_dict import MmapedDict

    folding = dead.with_suffix(".folding")
    try:
        os.replace(dead, folding)
    except FileNotFoundError:
        return
    if folding.stat().st_size == 0:  # killed while creating it (before sizing it): no value to keep
        folding.unlink()
        return
    values = MmapedDict.read_all_values_from_file(str(folding))
    target = MmapedDict(str(into))
    try:
        for key, value, timestamp, _ in values:
            total, latest = target.read_value(key)
            target.write_value(key, total + value, max(latest, timestamp))
    finally:
        target.close()
    folding.unlink()


@contextlib.contextmanager
def flock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` across processes (``fcntl``; where there is none, the
    caller's thread lock is all there is, which is enough for a node's one serving runtime)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
