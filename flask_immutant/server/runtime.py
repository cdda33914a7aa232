"""The app runtime: the child process that serves one app for its node.

Started by the node supervisor as ``python -m flask_immutant.server.runtime``. It inherits the
listening socket (the supervisor binds it, so a restarted or redeployed runtime reuses the port
without a gap), a *lifeline* pipe whose EOF means the supervisor died (even by SIGKILL), and a
*ready* pipe on which it reports that it serves. HTTP is served by waitress: a pure-Python,
production WSGI server with a thread pool, which suits one process that also runs worker and
daemon threads.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from ..extension import EXTENSION_KEY, ImmutantExtension, ImmutantState

log = logging.getLogger("flask_immutant.runtime")

#: Exit status when the supervisor disappeared (the lifeline pipe closed).
EXIT_ORPHANED = 70
#: Exit status when the app could not be imported or started (the supervisor reports it).
EXIT_APP_FAILED = 3


def set_parent_death_signal() -> None:
    """Linux: the kernel SIGKILLs this process when its parent dies. Used as ``preexec_fn``;
    the lifeline pipe covers other platforms and is the primary mechanism."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def load_app(app_import_path: str | None) -> Flask:
    """Load the app the way ``flask --app`` does, from the current directory."""
    from flask.cli import ScriptInfo

    app = ScriptInfo(app_import_path=app_import_path or None, set_debug_flag=False).load_app()
    if EXTENSION_KEY not in app.extensions:
        ImmutantExtension(app)  # a plain Flask app is served too, with the node's settings
    return app


class AppRuntime:
    """One app served by one process: its HTTP server, background threads and lifecycle."""

    def __init__(self, app: Flask, sock: socket.socket) -> None:
        self.app = app
        self.state: ImmutantState = app.extensions[EXTENSION_KEY]
        self.settings = self.state.settings
        self.stopping = threading.Event()
        self._sock = sock
        self._threads: list[threading.Thread] = []
        self._server: Any = None

    def spawn(self, name: str, target: Callable[[], Any]) -> threading.Thread:
        """Run ``target`` in a daemon thread inside the app context (for workers, daemons)."""

        def run() -> None:
            with self.app.app_context():
                target()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def start(self) -> None:
        from waitress.server import create_server

        self._server = create_server(
            self.app, sockets=[self._sock], threads=self.settings["IMMUTANT_THREADS"], ident="flask-immutant"
        )
        self.spawn("immutant-http", self._server.run)
        self.state.runtime = self
        self.state.pm.hook.immutant_runtime_started(runtime=self)

    def stop(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (bounded), stop background work."""
        deadline = time.monotonic() + timeout
        self.stopping.set()
        try:
            self.state.pm.hook.immutant_runtime_stopping(runtime=self)
        except Exception:
            log.exception("a plugin failed while stopping")
        server = self._server
        if server is None:
            return
        server.trigger.pull_trigger(server.close)  # listening socket only, from the loop thread
        while time.monotonic() < deadline and _open_channels(server) > 0:
            time.sleep(0.05)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=max(0.0, deadline - time.monotonic()))


def _open_channels(server: Any) -> int:
    from waitress.channel import HTTPChannel

    return sum(1 for channel in list(server._map.values()) if isinstance(channel, HTTPChannel))


def _watch_lifeline(fd: int) -> None:
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    print("flask-immutant: the node supervisor is gone; app runtime exits", file=sys.stderr, flush=True)
    os._exit(EXIT_ORPHANED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flask_immutant.server.runtime")
    parser.add_argument("--app", default="")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)

    threading.Thread(target=_watch_lifeline, args=(args.lifeline_fd,), name="immutant-lifeline", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    try:
        app = load_app(args.app)
        sock = socket.socket(fileno=args.listen_fd)
        runtime = AppRuntime(app, sock)
        runtime.start()
    except Exception as exc:
        log.exception("app %s failed to start", args.app or "(found in the current folder)")
        print(f"flask-immutant: app failed to start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_APP_FAILED
    os.write(args.ready_fd, b"ready\n")
    os.close(args.ready_fd)
    stop.wait()
    runtime.stop(runtime.settings["IMMUTANT_SHUTDOWN_TIMEOUT"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
