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
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, NoReturn, cast

from flask import Flask

from .. import startup
from ..extension import EXTENSION_KEY, ImmutantExtension, ImmutantState
from ..logs import say, setup_logging
from .bytecode import drop_stale_bytecode
from .environ import DeploymentEnviron

log = logging.getLogger("flask_immutant.runtime")

#: Exit status when the supervisor disappeared (the lifeline pipe closed).
EXIT_ORPHANED = 70
#: Exit status when the app could not be imported or started (the supervisor reports it).
EXIT_APP_FAILED = 3
#: Seconds a draining runtime keeps a kept-alive connection open for its client's next request,
#: counted from the connection's last activity, and only within this long of the drain's start
#: (``AppRuntime.stop``, ``_close_idle_channels``).
IDLE_GRACE = 1.0
#: Seconds of ``IMMUTANT_SHUTDOWN_TIMEOUT`` a stopping runtime keeps for what follows its drain
#: (leases closed, health withdrawn, logs flushed, exit) and for the SIGTERM's way to it; a
#: fifth of the timeout when that is less (:func:`drain_timeout`).
EXIT_MARGIN = 1.0


def drain_timeout(shutdown_timeout: float) -> float:
    """How long a stopping runtime drains (requests, background work): its supervisor's
    ``shutdown_timeout`` less :data:`EXIT_MARGIN`. The supervisor kills a runtime only at the
    full timeout, counted from its SIGTERM (``supervisor.RuntimeProcess.finish_stop``), so a drain
    that runs to its deadline still ends in the runtime's own clean exit, not in a SIGKILL."""
    return shutdown_timeout - min(EXIT_MARGIN, shutdown_timeout / 5)


def load_app(app_import_path: str | None) -> Flask:
    """Load the app the way ``flask --app`` does, from the current directory."""
    from flask.cli import ScriptInfo

    app = ScriptInfo(app_import_path=app_import_path or None, set_debug_flag=False).load_app()
    if EXTENSION_KEY not in app.extensions:
        ImmutantExtension(app)  # a plain Flask app is served too, with the node's settings
    return app


class AppRuntime:
    """One app served by one process: its HTTP server, background threads and lifecycle."""

    def __init__(self, app: Flask, sock: socket.socket, context_path: str = "/") -> None:
        self.app = app
        self.context_path = "/" + context_path.strip("/") if context_path.strip("/") else "/"
        self.state: ImmutantState = app.extensions[EXTENSION_KEY]
        self.settings = self.state.settings
        self.stopping = threading.Event()
        self.stop_deadline: float | None = None
        self._sock = sock
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        #: Requests being handled now (read by the load factor the balancer sees).
        self.active_requests = 0
        self._active_lock = threading.Lock()

    def spawn(self, name: str, target: Callable[[], Any]) -> threading.Thread:
        """Run ``target`` in a daemon thread inside the app context (for workers, daemons)."""

        def run() -> None:
            with self.app.app_context():
                target()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """The served WSGI callable: the app, mounted at its context path."""
        if self.context_path != "/":
            path = environ.get("PATH_INFO", "")
            if path != self.context_path and not path.startswith(self.context_path + "/"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [f"not under this app's context path {self.context_path}\n".encode()]
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + self.context_path
            environ["PATH_INFO"] = path[len(self.context_path):]
        with self._active_lock:
            self.active_requests += 1
        try:
            return self.app(environ, start_response)
        finally:
            with self._active_lock:
                self.active_requests -= 1

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        from waitress.server import create_server

        from .http import raise_descriptor_limit, waitress_limits, with_read_deadline, with_trusted_proxies

        raise_descriptor_limit(self.settings["IMMUTANT_HTTP_CONNECTION_LIMIT"])

        self._server = create_server(
            with_trusted_proxies(self.wsgi, self.settings["IMMUTANT_TRUSTED_PROXIES"]), sockets=[self._sock],
            threads=self.settings["IMMUTANT_THREADS"], ident="flask-immutant", **waitress_limits(self.settings),
        )
        self._server.channel_class = with_read_deadline(_draining_channel(self.stopping),
                                                        self.settings["IMMUTANT_HTTP_READ_TIMEOUT"])
        self.spawn("immutant-http", self._server.run)
        self.state.runtime = self
        self.state.pm.hook.immutant_runtime_started(runtime=self)

    def stop(self, timeout: float) -> None:
        """Stop accepting (the listening socket stays open in the supervisor and any newer
        runtime), stop background work, let in-flight requests finish, close idle connections."""
        deadline = self.stop_deadline = time.monotonic() + timeout
        # Idle connections get IDLE_GRACE from the drain's start, once: a client that keeps its
        # connection "active" with empty requests (CRLFs) cannot stretch the drain past it.
        grace_ends = min(time.monotonic() + IDLE_GRACE, deadline - 0.1)
        self.stopping.set()
        server = self._server
        if server is not None:
            from waitress import wasyncore

            # Our copy of the listener only (server.close() would also close the trigger we
            # still need), from the loop thread.
            server.trigger.pull_trigger(lambda: wasyncore.dispatcher.close(server))
        self._stop_plugins(deadline)
        if server is None:
            return
        while time.monotonic() < deadline:
            closed = threading.Event()
            grace = IDLE_GRACE if time.monotonic() < grace_ends else 0.0
            server.trigger.pull_trigger(functools.partial(_close_idle_channels, server, grace, closed))
            closed.wait(max(0.0, min(0.05, deadline - time.monotonic())))  # the loop thread closed them
            if not _channels(server):
                break
            time.sleep(0.01)  # requests in progress, or clients that may still send: look again soon
        busy = _channels(server)
        if busy:
            log.warning("the drain ran out of time with %d connection(s) still open (a request arriving or "
                        "in progress, or a client not reading); exiting, which closes them", len(busy))
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=max(0.0, deadline - time.monotonic()))


    def _stop_plugins(self, deadline: float) -> None:
        """Call every ``immutant_runtime_stopping`` implementation at once, each in a thread, and
        wait for all (until ``deadline``): features stop independently, so a daemon's handover
        does not wait for Dramatiq's workers, nor the other way round. Wrappers (``wrapper=True``:
        the cluster plugin closes the leases once the features are done) run around them all."""
        hook = self.state.pm.hook.immutant_runtime_stopping
        impls = hook.get_hookimpls()
        if any(impl.hookwrapper for impl in impls):  # old-style wrappers: pluggy's own, serial call
            _stop_one(hook, "(all)", {"runtime": self})
            return
        kwargs = {"runtime": self}
        wrappers: list[Generator[None, Any, Any]] = []
        for impl in [i for i in impls if i.wrapper]:
            try:
                generator = cast("Generator[None, Any, Any]",
                                 impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames}))
                next(generator)
                wrappers.append(generator)
            except Exception:
                log.exception("plugin %s failed while stopping", impl.plugin_name)
        threads = []
        for impl in [i for i in impls if not i.wrapper]:
            thread = threading.Thread(
                target=_stop_one, name=f"immutant-stop-{impl.plugin_name}", daemon=True,
                args=(impl.function, impl.plugin_name, {k: v for k, v in kwargs.items() if k in impl.argnames}))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for generator in reversed(wrappers):
            try:
                generator.send([])  # the results of the inner calls (none: the hook returns nothing)
            except StopIteration:
                pass
            except Exception:
                log.exception("a plugin failed while stopping")


def _stop_one(function: Callable[..., Any], plugin: str, kwargs: dict[str, Any]) -> None:
    try:
        function(**kwargs)
    except Exception:
        log.exception("plugin %s failed while stopping", plugin)


def _draining_channel(stopping: threading.Event) -> type:
    """waitress's channel, whose responses say ``Connection: close`` once the runtime drains,
    so keep-alive clients reconnect (to the newer runtime) instead of finding a closed socket.
    A WSGI app may not set that hop-by-hop header itself, so it is done at the task."""
    from waitress.channel import HTTPChannel
    from waitress.task import WSGITask

    class DrainingTask(WSGITask):
        def build_response_header(self) -> bytes:
            if stopping.is_set():
                # waitress's stubs type Task.request as an ErrorTask's Error; a WSGITask's is its parser
                self.request.headers["CONNECTION"] = "close"  # type: ignore[attr-defined]
            return super().build_response_header()

    class DrainingChannel(HTTPChannel):
        task_class = DrainingTask

    return DrainingChannel


def _channels(server: Any) -> list[Any]:
    from waitress.channel import HTTPChannel

    return [channel for channel in list(server._map.values()) if isinstance(channel, HTTPChannel)]


def _close_idle_channels(server: Any, grace: float, done: threading.Event) -> None:
    """Close kept-alive connections with no request in progress and no activity for ``grace``
    seconds (runs in the loop thread). A client between two requests sends its next one on the
    connection it holds; closed under it, that request fails (RemoteDisconnected), so a recently
    used connection is kept a moment to be answered with ``Connection: close`` instead. Closing an
    idle connection always races a client that sends just then: the grace makes that a client
    idle for ``grace`` seconds, not one that paused between two requests."""
    try:
        now = time.time()  # waitress stamps last_activity with time.time()
        for channel in _channels(server):
            with channel.requests_lock:
                idle = not channel.requests and channel.request is None and not channel.total_outbufs_len
            if idle and now - channel.last_activity >= grace:
                channel.handle_close()
    finally:
        done.set()


def _watch_lifeline(fd: int) -> None:
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    say("flask-immutant: the node supervisor is gone; app runtime exits", log.name, err=True)
    os._exit(EXIT_ORPHANED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flask_immutant.server.runtime")
    parser.add_argument("--app", default="")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    startup.starting()

    threading.Thread(target=_watch_lifeline, args=(args.lifeline_fd,), name="immutant-lifeline", daemon=True).start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    try:  # logging first, so that even a garbled deployment is reported in the node's log format
        deployment_name = DeploymentEnviron.current().name
    except ValueError:
        deployment_name = None
    setup_logging(runtime=True, deployment=deployment_name)
    try:
        deployment = DeploymentEnviron.current()
        drop_stale_bytecode(os.getcwd())  # the app's folder: never run an older version's bytecode
        app = load_app(args.app)
        app.config.update(deployment.config)
        sock = socket.socket(fileno=args.listen_fd)
        runtime = AppRuntime(app, sock, deployment.context_path)
        runtime.start()
    except Exception as exc:
        log.exception("app %s failed to start", args.app or "(found in the current folder)")
        reason = f"{type(exc).__name__}: {exc}"
        say(f"flask-immutant: app failed to start: {reason}", log.name, err=True)
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, f"failed {reason}".replace("\n", " ").encode()[:4000] + b"\n")
        return EXIT_APP_FAILED
    os.write(args.ready_fd, b"ready\n")
    os.close(args.ready_fd)
    startup.started()
    stop.wait()
    runtime.stop(drain_timeout(runtime.settings["IMMUTANT_SHUTDOWN_TIMEOUT"]))
    return 0


#: Longest wait at exit for the event log's last writes, seconds.
EVENTS_FLUSH = 1.0


def exit_now(code: int) -> NoReturn:
    """Leave without tearing the interpreter down: the stop hooks have run, every thread was given
    its bounded stop, and unloading the libraries would only add to the node's stop time. The
    events the stop emitted (a lease released) are written first: atexit's flush never runs here,
    and the event log's own thread may not have got to them."""
    event_log = sys.modules.get("flask_immutant.events.log")  # loaded if this process emits events
    if event_log is not None:  # on a thread: a store that stopped answering must not hold the exit
        flushing = threading.Thread(target=event_log.flush, args=(EVENTS_FLUSH,), daemon=True)
        flushing.start()
        flushing.join(EVENTS_FLUSH)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
