"""Metrics in this process: turning them on, the node's multi-process folder, and rendering.

A node's supervisor and its app runtimes are separate processes, so prometheus_client runs in
its multi-process mode: the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a folder in the
node's data dir and empties it when the node starts; every runtime (it inherits the variable)
writes its values to files there, and a scrape served by any of them reads them all. A process
with no such folder (the embedded balancer, an app served without a node) keeps its values in
memory and serves its own.

prometheus_client is process-global by nature (the folder holds one file set per pid), so this
module is too; nothing here is imported until metrics are on.

A process that is gone leaves files behind. So that a node that restarts runtimes for months does
not read thousands of files per scrape, each scrape folds a dead process's counters and
histograms into one archive file per kind (:mod:`.archive`) and deletes its gauges. Whether a pid
is still the process that wrote the files is decided by the start time it recorded
(:func:`started`), not by the pid alone: pids are reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import archive
from .definitions import ALL

#: prometheus_client reads its multi-process folder from this variable.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The folder under a node's data dir.
FOLDER = "metrics"
#: A process's files that a scrape folds when it is gone: prometheus_client's ``KIND[_MODE]_PID.db``
#: of the kinds and gauge modes the definitions use (live gauges: a dead process's values go).
_PID_FILE = re.compile(r"^(counter|histogram|gauge_live\w*?)_(\d+)\.db$")
#: What a process records about itself on :func:`enable`: its start time (:func:`started`).
_STARTED = "started_{}"

log = logging.getLogger("flask_immutant.metrics")
_lock = threading.Lock()
_render_lock = threading.Lock()
#: The mode the definitions are bound in: None (off), "memory" or the multi-process folder.
_bound: str | None = None
_registry: Any = None


def prepare_folder(data_dir: Path) -> Path:
    """The node's metrics folder, emptied (values of a previous run are stale) and exported, so
    runtimes started from here on write to it. Called by the supervisor before any runtime."""
    folder = Path(data_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in (*folder.glob("*.db"), *folder.glob("*.folding"), *folder.glob(_STARTED.format("*"))):
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
        if mode != "memory":
            record_start(mode)
            _at_fork_once()
        _bound = mode


_forks_watched = False


def _at_fork_once() -> None:
    """A child forked from a process that records (a zygote's runtimes) notes its own start."""
    global _forks_watched
    if not _forks_watched and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_record_in_child)
        _forks_watched = True


def _record_in_child() -> None:
    if _bound not in (None, "memory"):
        record_start(str(_bound))


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
    if folder:
        with _locked(Path(folder)):
            forget_dead_processes(Path(folder))
            output = _render_folder(folder)
    else:
        output = generate_latest(_registry if _registry is not None else CollectorRegistry())
    for collector in extra:
        cached = getattr(collector, "exposition", None)
        if cached is not None:  # a collector that renders its own reading once (.cluster)
            output += cached()
            continue
        scraped = CollectorRegistry(auto_describe=False)
        scraped.register(collector)
        output += generate_latest(scraped)
    return output, CONTENT_TYPE_LATEST


#: Per folder: its :class:`.folder.FolderRender`, kept across scrapes, or None once the folder
#: held a file it does not handle (a summary, a ``mostrecent`` gauge an app recorded itself).
_folder_renders: dict[str, Any] = {}


def _render_folder(folder: str) -> bytes:
    """The folder's text by :class:`.folder.FolderRender`, or by prometheus_client's collector
    for a folder holding a file the former does not handle. Caller holds the folder lock."""
    from .folder import FolderRender, Unsupported

    if folder not in _folder_renders:
        _folder_renders[folder] = FolderRender()
    fast = _folder_renders[folder]
    if fast is not None:
        try:
            return bytes(fast.render(folder))
        except Unsupported as exc:
            log.info("metrics: %s holds a file of a kind only prometheus_client renders (%s); it renders "
                     "every scrape from now on", folder, exc)
            _folder_renders[folder] = None
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(WrittenFiles(Path(folder)))
    return generate_latest(registry)


class WrittenFiles:
    """prometheus_client's multi-process collector (the fallback of :func:`_render_folder`), over
    the files a process has finished creating (:func:`.folder.written`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        from .folder import written

        return MultiProcessCollector.merge([str(path) for path in self.folder.glob("*.db") if written(str(path))],
                                           accumulate=True)


def forget_dead_processes(folder: Path) -> list[int]:
    """Fold the files of every process that wrote to ``folder`` and is gone into the archives (a
    runtime that exited, was SIGKILLed, or was forked and died): its counters and histograms are
    added to one file per kind, its gauges (live modes) dropped. Done at scrape time, under the
    folder's lock, so no supervisor code has to report exits; returns the pids folded."""
    files: dict[int, list[str]] = {}
    for name in os.listdir(folder):
        found = _PID_FILE.match(name)
        if found:
            files.setdefault(int(found.group(2)), []).append(name)
    gone = [pid for pid in sorted(files) if not _alive(pid, folder)]
    for pid in gone:
        for name in files[pid]:
            kind = name.split("_", 1)[0]
            if kind in archive.KINDS:
                archive.fold(folder / name, folder / archive.name_of(kind))
            else:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
        with contextlib.suppress(FileNotFoundError):
            (folder / _STARTED.format(pid)).unlink()
    return gone


def started(pid: int) -> str | None:
    """When ``pid`` started, as the kernel counts it (``/proc``), or None where that cannot be read
    (not Linux, or no such process): a reused pid has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def record_start(folder: str | Path) -> None:
    """Note this process's start time in ``folder`` (on enable, and in a forked child)."""
    with contextlib.suppress(OSError):
        (Path(folder) / _STARTED.format(os.getpid())).write_text(started(os.getpid()) or "")


def _alive(pid: int, folder: Path) -> bool:
    """Whether ``pid`` is still the process that wrote its files in ``folder``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process now: our runtimes run as us
        return False
    try:
        recorded = (folder / _STARTED.format(pid)).read_text()
    except OSError:
        return True  # no record (written before this version, or the write failed): the pid alone
    now = started(pid)
    return not recorded or now is None or now == recorded


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The folder's lock, across the processes of a node: one scrape folds at a time, and no
    scrape reads a file another is folding."""
    with _render_lock, archive.flock(folder):
        yield
