"""Metrics in this process: turning them on, the node's multi-process folder, and rendering.

A node's supervisor and its app runtimes are separate processes, so prometheus_client runs in
its multi-process mode: the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a folder in the
node's data dir and empties it when the node starts; every runtime (it inherits the variable)
writes its values to files there, and a scrape served by any of them reads them all. A process
with no such folder (the embedded balancer, an app served without a node) keeps its values in
memory and serves its own.

prometheus_client is process-global by nature (the folder holds one file set per pid), so this
module is too; nothing here is imported until metrics are on.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .definitions import ALL

#: prometheus_client reads its multi-process folder from this variable.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The folder under a node's data dir.
FOLDER = "metrics"
#: Per-process gauge files of modes whose dead processes' values must go (``mark_process_dead``).
_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")

_lock = threading.Lock()
#: The mode the definitions are bound in: None (off), "memory" or the multi-process folder.
_bound: str | None = None
_registry: Any = None


def prepare_folder(data_dir: Path) -> Path:
    """The node's metrics folder, emptied (values of a previous run are stale) and exported, so
    runtimes started from here on write to it. Called by the supervisor before any runtime."""
    folder = Path(data_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in folder.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def enable() -> None:
    """Turn metrics on in this process: bind every definition to a prometheus_client object, in
    multi-process mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (else in memory). Idempotent;
    binds again if the variable changed since (it must be set before any value is written)."""
    global _bound, _registry
    mode = os.environ.get(MULTIPROC_ENV) or "memory"
    with _lock:
        if _bound == mode:
            return
        from prometheus_client import CollectorRegistry, values

        values.ValueClass = values.get_value_class()  # chosen at import; the variable may be newer
        _registry = CollectorRegistry(auto_describe=True) if mode == "memory" else None
        for metric in ALL:
            metric.bind(_registry)
        _bound = mode


def disable() -> None:
    """Metrics off in this process (tests): every call site is a no-op again."""
    global _bound, _registry
    with _lock:
        for metric in ALL:
            metric.unbind()
        _bound, _registry = None, None


def enabled() -> bool:
    return _bound is not None


def render(extra: Iterable[Any] = ()) -> tuple[bytes, str]:
    """The exposition text of this node (all its processes' values, plus the ``extra``
    collectors read at scrape time) and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    folder = os.environ.get(MULTIPROC_ENV)
    registry: Any
    if folder:
        from prometheus_client.multiprocess import MultiProcessCollector

        forget_dead_processes(Path(folder))
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
    else:
        registry = _registry if _registry is not None else CollectorRegistry()
    output = generate_latest(registry)
    for collector in extra:
        scraped = CollectorRegistry(auto_describe=False)
        scraped.register(collector)
        output += generate_latest(scraped)
    return output, CONTENT_TYPE_LATEST


def forget_dead_processes(folder: Path) -> list[int]:
    """``mark_process_dead`` for every process whose live gauges are in ``folder`` but which is
    gone: a runtime that exited, was SIGKILLed or was forked from a zygote and died. Done at
    scrape time, so no supervisor code has to report exits; returns the pids forgotten."""
    from prometheus_client.multiprocess import mark_process_dead

    pids = {int(m.group(1)) for m in map(_LIVE_FILE.match, os.listdir(folder)) if m}
    gone = [pid for pid in sorted(pids) if not _alive(pid)]
    for pid in gone:
        with contextlib.suppress(FileNotFoundError):
            mark_process_dead(pid, str(folder))
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid now belongs to someone else's process: not ours, but taken
        return True
    return True
