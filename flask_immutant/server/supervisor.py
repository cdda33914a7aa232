"""The one supervisor of a node's app runtimes: start, restart with backoff, drain, stop.

The app a node is started with (``flask immutant run --app``) and every deployment it runs are
:class:`Unit` s of the same :class:`Supervisor`: the node and the deployer decide *what* runs,
this module is the only code that starts, restarts and stops runtime processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Protocol

from ..loops import Backoff
from .runtime import EXIT_APP_FAILED
from .spawn import popen
from .zygote import fork_runtime

log = logging.getLogger("flask_immutant.node")

#: Restart backoff of a crashed app runtime: first delay, cap, and the uptime that resets it.
RESTART_BACKOFF = (0.5, 30.0, 30.0)
#: Seconds an app runtime has to report ready before it is taken as failed.
READY_TIMEOUT = 60.0


@dataclass
class AppTarget:
    """What app a runtime serves: an import path as ``flask --app`` takes it, and the folder
    the path is relative to."""

    import_path: str | None
    root: str = field(default_factory=os.getcwd)

    @property
    def label(self) -> str:
        return self.import_path or os.path.basename(self.root)


class Process(Protocol):
    """What the supervisor needs of a runtime process: a :class:`subprocess.Popen`, or a process
    forked by the runtime template (:mod:`.zygote`)."""

    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class RuntimeProcess:
    """One app runtime child and the pipes that tie it to this supervisor."""

    def __init__(self, target: AppTarget, listener: socket.socket, environ: dict[str, str]) -> None:
        self.target = target
        self.environ = environ
        self.listener = listener
        self.process: Process | None = None
        self.started_at = 0.0
        self.ready = False
        #: Why the runtime did not become ready (the app's import error, say), once known.
        self.failure: str | None = None
        self._lifeline_w: int | None = None
        self._ready_r: IO[bytes] | None = None

    def spawn(self) -> None:
        lifeline_r, self._lifeline_w = os.pipe()
        ready_r, ready_w = os.pipe()
        fds = (self.listener.fileno(), lifeline_r, ready_w)
        args = ["--app", self.target.import_path or "", "--listen-fd", str(fds[0]),
                "--lifeline-fd", str(lifeline_r), "--ready-fd", str(ready_w)]
        env = {**os.environ, **self.environ, "PYTHONUNBUFFERED": "1"}
        try:
            self.process = fork_runtime(self.target.import_path or "", self.target.root, env, fds)
            if self.process is None:  # no template here (portable mode, or it failed): a fresh interpreter
                self.process = popen([sys.executable, "-m", "flask_immutant.server.runtime", *args],
                                     self.target.root, env, fds)
        finally:
            os.close(lifeline_r)
            os.close(ready_w)
        os.set_inheritable(self._lifeline_w, False)
        self._ready_r = os.fdopen(ready_r, "rb")
        self.started_at = time.monotonic()
        self.ready = False
        self.failure = None

    def wait_ready(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """Block until the runtime reports ready (True), or exits, times out or is cancelled."""
        assert self._ready_r is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (cancel and cancel.is_set()):
            readable, _, _ = select.select([self._ready_r], [], [], 0.1)
            if readable:
                line = self._ready_r.readline().decode(errors="replace").strip()
                self.ready = line == "ready"
                if line.startswith("failed "):
                    self.failure = line[len("failed "):]
                elif not self.ready:
                    self.failure = "the app runtime exited before it was ready"
                return self.ready
        return False

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        """Ask the runtime to stop (it drains, then exits); :meth:`finish_stop` waits for it."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def finish_stop(self, deadline: float) -> None:
        """Wait for a terminated runtime until ``deadline`` (monotonic), then kill it. The runtime
        gives up its drain a margin before (:func:`.runtime.drain_timeout`), so only a stuck one is killed."""
        if self.process is not None:
            try:
                self.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("app runtime %s did not stop in time; killing it", self.target.label)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait()
        self.close_pipes()

    def stop(self, timeout: float) -> None:
        self.terminate()
        self.finish_stop(time.monotonic() + timeout)

    def close_pipes(self) -> None:
        if self._lifeline_w is not None:
            with contextlib.suppress(OSError):
                os.close(self._lifeline_w)
            self._lifeline_w = None
        if self._ready_r is not None:
            self._ready_r.close()
            self._ready_r = None


def stop_all(runtimes: Iterable[RuntimeProcess], timeout: float) -> None:
    """Stop runtimes in parallel: all are told at once, then each is waited for (or killed) by one
    shared deadline, so N runtimes take as long as the slowest, not the sum."""
    runtimes = list(runtimes)
    deadline = time.monotonic() + timeout
    for runtime in runtimes:
        runtime.terminate()
    for runtime in runtimes:
        runtime.finish_stop(deadline)


@dataclass(eq=False)
class Unit:
    """One app this node runs (its ``--app`` one, or a deployment): a runtime that is restarted
    with :data:`RESTART_BACKOFF` when it exits without being asked to."""

    label: str
    runtime: RuntimeProcess
    backoff: Backoff = field(default_factory=lambda: Backoff(*RESTART_BACKOFF))
    #: When the crashed runtime is started again (monotonic; 0: it is not waiting to restart).
    restart_at: float = 0.0
    #: Why it last exited, while it waits to restart.
    crash: str | None = None


class Supervisor:
    """Starts, restarts and stops units. ``cancel`` (the node's stop request) cuts a wait for a
    runtime to become ready short."""

    def __init__(self, cancel: threading.Event, on_crash: Callable[[], None] | None = None) -> None:
        self.cancel = cancel
        #: Called (on the checking thread; it must not block) when a runtime is found exited.
        self.on_crash = on_crash or (lambda: None)

    def start(self, label: str, target: AppTarget, listener: socket.socket, environ: dict[str, str]) -> Unit:
        """Spawn a runtime and wait until it serves; ``unit.runtime.ready`` says whether it does
        (else ``unit.runtime.failure`` says why)."""
        unit = Unit(label, RuntimeProcess(target, listener, environ))
        unit.runtime.spawn()
        unit.runtime.wait_ready(READY_TIMEOUT, self.cancel)
        return unit

    def check(self, unit: Unit) -> str | None:
        """Restart ``unit``'s runtime if it exited, once its backoff delay has passed. Returns
        ``"crashed"`` when it just found it exited (``unit.crash`` says how), ``"restarted"`` when a
        restart serves again, else None."""
        runtime = unit.runtime
        if unit.restart_at == 0.0:
            code = runtime.poll()
            if code is None:
                return None
            runtime.close_pipes()
            delay = unit.backoff.next_delay(time.monotonic() - runtime.started_at)
            unit.crash = "failed to start" if code == EXIT_APP_FAILED else f"exited with status {code}"
            unit.restart_at = time.monotonic() + delay
            log.warning("app runtime %s %s; restarting in %.1fs", unit.label, unit.crash, delay)
            try:
                self.on_crash()
            except Exception:
                log.exception("app runtime %s: the crash handler failed", unit.label)
            return "crashed"
        if time.monotonic() < unit.restart_at or self.cancel.is_set():
            return None
        unit.restart_at = 0.0
        runtime.spawn()
        if runtime.wait_ready(READY_TIMEOUT, self.cancel):
            unit.crash = None
            return "restarted"
        return None  # it exited again: the next check schedules the next try
