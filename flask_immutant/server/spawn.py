"""Child processes that die with this one: started from one long-lived thread, with the
parent-death signal set (Linux). Used for app runtimes and the runtime template."""

from __future__ import annotations

import queue
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ..portable import set_parent_death_signal

T = TypeVar("T")


class _Spawner:
    """Starts every child process from one thread that lives as long as the process.

    Linux binds a child's parent-death signal to the *thread* that forked it, not the process: a
    runtime spawned from a thread that ends (the deployer's, at shutdown) is SIGKILLed right then,
    before the node could stop it gracefully. From this thread it dies only with the node.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="immutant-spawner", daemon=True)
                self._thread.start()
        done: Future[T] = Future()
        self._requests.put((fn, done))
        return done.result()

    def _run(self) -> None:
        while True:
            fn, done = self._requests.get()
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)


spawner = _Spawner()


def popen(args: list[str], cwd: str, env: dict[str, str], pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """A child that dies with this process (parent-death signal, from the long-lived spawner)."""
    return spawner.call(lambda: subprocess.Popen(
        args, cwd=cwd, env=env, pass_fds=pass_fds, stdin=subprocess.DEVNULL, preexec_fn=set_parent_death_signal,
    ))


