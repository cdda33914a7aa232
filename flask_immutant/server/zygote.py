"""The runtime template (a zygote): a process with Flask, waitress, this package and its feature
libraries already imported, which forks one child per app runtime, so a runtime pays only for
importing the app itself (docs/design.md, "Runtimes fork from a template").

The node starts the template (``python -m flask_immutant.server.zygote``) as its first act, so
the imports overlap with the node's own start-up. The template never imports a user's app (a
deployment's code changes between versions) and stays single-threaded and without store
connections, so forking it is safe. It talks to the node over a ``SOCK_SEQPACKET`` pair: a fork
request carries the app, its folder, its environment and the runtime's three descriptors; the
template answers with the child's pid, and later with the child's exit status.

SIGKILL semantics hold through the chain: the template has the node as parent-death parent, each
runtime the template; a killed node takes the template along, which takes the runtimes along. The
lifeline pipe works as before. Linux only (the parent-death signal is); elsewhere, and with
``IMMUTANT_PORTABLE=1``, :func:`fork_runtime` returns None and runtimes start as fresh interpreters.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from ..portable import linux_extras, set_parent_death_signal
from .spawn import popen

log = logging.getLogger("flask_immutant.node")

#: What the template imports before it forks the first runtime: what every runtime imports
#: before it serves HTTP (the built-in plugins too). A name that no longer imports is a test
#: failure (tests/test_zygote.py), not a silent slow start.
PRELOAD = (
    "flask", "flask.cli", "werkzeug.routing", "jinja2", "redis", "pluggy", "click",
    "waitress.server", "waitress.channel", "waitress.task", "waitress.proxy_headers", "waitress.wasyncore",
    "flask_immutant", "flask_immutant.plugins", "flask_immutant.server.runtime", "flask_immutant.server.http",
)
#: What it imports afterwards, one module at a time while no fork is asked for: what features
#: import once a runtime serves (a fork asked for meanwhile waits for one module at most).
PRELOAD_LATER = (
    "flask_immutant.cluster.lease", "flask_immutant.cluster.membership", "flask_immutant.daemons.runner",
    "flask_immutant.jobs.driver", "flask_immutant.messaging.core", "flask_immutant.messaging.engine",
    "flask_immutant.messaging.redis_broker", "flask_immutant.contexts.registry", "flask_immutant.daemons.registry",
    "flask_immutant.caching", "dramatiq", "cachelib", "croniter", "msgpack",
    # what an app with sessions, the cache and jobs imports as it loads and serves its first request
    "flask_immutant.web.sessions", "flask_immutant.web.near", "flask_immutant.caching.caches",
    "flask_immutant.jobs.registry", "importlib.readers", "encodings.idna",
    # loaded on first use since the CLI's status stopped importing them, and by every runtime
    "flask_immutant.events.log", "flask_immutant.events.kinds", "flask_immutant.cluster.identity",
)
#: The process name (``comm``) of the template, so ``ps`` and tests tell it from its runtimes.
TEMPLATE_NAME = b"immutant-tmpl"
#: The process name a forked runtime takes.
RUNTIME_NAME = b"immutant-app"
#: Largest fork request (the environment is most of it).
MAX_MESSAGE = 1 << 20
PR_SET_NAME = 15


# --- in the node ---------------------------------------------------------------------------------


class ForkedProcess:
    """A runtime forked by the template: the part of :class:`subprocess.Popen` the supervisor uses.
    Its exit status comes from the template (its parent), which reaps it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"app runtime {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def exited(self, code: int) -> None:
        self.returncode = code
        self._exited.set()


class Template:
    """The node's handle on its template process: a fork of the node itself when it has no
    thread yet (the node starts it first thing), else ``python -m flask_immutant.server.zygote``."""

    def __init__(self, spawn: Callable[[list[str], str, dict[str, str], tuple[int, ...]], Any]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = ours
        self._lock = threading.Lock()
        self._replies: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._children: dict[int, ForkedProcess] = {}
        self._early: dict[int, int] = {}  # exits reported before the fork's answer was read
        self._exits = threading.Lock()  # guards _children and _early
        self.alive = True
        if threading.active_count() == 1:
            # Single-threaded, no store connection yet: this process itself is the template, with
            # everything the CLI imported (Flask, the plugins) already there.
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            node = os.getpid()
            pid = os.fork()
            if pid == 0:
                ours.close()
                _become_template(theirs, node)
            self.pid = pid
        else:  # a replacement, once the node runs threads: a fresh interpreter imports it all
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.pid = spawn([sys.executable, "-m", "flask_immutant.server.zygote", str(theirs.fileno())],
                             os.getcwd(), env, (theirs.fileno(),)).pid  # the node's sys.path[0]
        theirs.close()
        self._reader = threading.Thread(target=self._read, name="immutant-template", daemon=True)
        self._reader.start()

    def fork(self, app: str, root: str, env: dict[str, str], fds: tuple[int, ...]) -> ForkedProcess:
        """A runtime for ``app`` in ``root`` with ``env``, given descriptors (listen, lifeline, ready)."""
        request = json.dumps({"app": app, "root": root, "env": env}).encode()
        with self._lock:
            if not self.alive:
                raise OSError("the runtime template is gone")
            socket.send_fds(self._control, [request], list(fds))
            reply = self._replies.get()
            if "error" in reply:
                raise OSError(reply["error"])
            child = ForkedProcess(int(reply["pid"]))
            with self._exits:
                self._children[child.pid] = child
                early = self._early.pop(child.pid, None)
            if early is not None:
                child.exited(early)
        return child

    def close(self) -> None:
        """Let the template exit (its runtimes must be stopped first: they die with it)."""
        self.alive = False
        with contextlib.suppress(OSError):
            self._control.shutdown(socket.SHUT_RDWR)

    def _read(self) -> None:
        while True:
            try:
                data = self._control.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            if "exited" in message:
                pid, code = int(message["exited"]), int(message["code"])
                with self._exits:
                    child = self._children.pop(pid, None)
                    if child is None:
                        self._early[pid] = code
                if child is not None:
                    child.exited(code)
            else:
                self._replies.put(message)
        # The template is gone: its runtimes died with it (parent-death signal).
        self.alive = False
        self._replies.put({"error": "the runtime template exited"})
        with self._exits:
            children, self._children = list(self._children.values()), {}
        for child in children:
            child.exited(-signal.SIGKILL)
        self._control.close()


_template: Template | None = None
_template_lock = threading.Lock()


def start_template() -> None:
    """Start this process's runtime template (a node does, first thing); a no-op where
    templates are not used (not Linux, or ``IMMUTANT_PORTABLE=1``)."""
    global _template
    if not linux_extras():
        return
    with _template_lock:
        if _template is None or not _template.alive:
            _template = Template(popen)


def fork_runtime(app: str, root: str, env: dict[str, str], fds: tuple[int, ...]) -> ForkedProcess | None:
    """A runtime forked from the template, or None when there is none (the caller then starts a
    fresh interpreter). A template that died is started again."""
    global _template
    with _template_lock:
        template = _template
    if template is None:
        return None
    if not template.alive:
        start_template()
        with _template_lock:
            template = _template
        assert template is not None
    try:
        return template.fork(app, root, env, fds)
    except OSError as exc:
        log.warning("the runtime template could not fork (%s); starting a fresh interpreter", exc)
        return None


def stop_template() -> None:
    global _template
    with _template_lock:
        template, _template = _template, None
    if template is not None:
        template.close()


# --- in the template ---------------------------------------------------------------------------


def preload_list() -> list[str]:
    """Every module the template imports, in order: :data:`PRELOAD`, the built-in plugins, then
    :data:`PRELOAD_LATER`."""
    from ..plugins import DEFAULT_PLUGINS

    return [*PRELOAD, *DEFAULT_PLUGINS, *PRELOAD_LATER]


def preload(names: list[str] | None = None) -> list[str]:
    """Import ``names`` (default: all of :func:`preload_list`); returns what failed to import
    (an optional library that is not installed)."""
    failed = []
    for name in preload_list() if names is None else names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failed.append(f"{name}: {exc}")
    return failed


def _set_name(name: bytes) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def _serve(control: socket.socket, later: list[str]) -> tuple[dict[str, Any], list[int]] | None:
    """The template's loop: fork on request, report exits, import ``later`` one module at a time
    while idle. Returns in a forked child (its request and descriptors), or None when the node
    is gone."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the node's to handle
    zygote = os.getpid()
    while True:
        readable, _, _ = select.select([control.fileno(), wake_r], [], [], 0 if later else None)
        if not readable and later:
            _report_failures(preload([later.pop(0)]))
            continue
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            control.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
        if control.fileno() not in readable:
            continue
        data, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, 3)
        if not data:
            return None
        if threading.active_count() != 1:  # forking a process with threads could copy a held lock
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"error": "the template has threads; not forking"}).encode())
            continue
        gc.freeze()  # the child shares the template's pages; none of its collections scans them
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for fd in (wake_r, wake_w):
                os.close(fd)
            control.close()
            set_parent_death_signal()
            if os.getppid() != zygote:  # the template died before the signal was armed
                os._exit(70)
            return json.loads(data), fds
        for fd in fds:
            os.close(fd)
        control.send(json.dumps({"pid": pid}).encode())


def _run_child(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In a forked child: become the runtime ``python -m flask_immutant.server.runtime`` would be."""
    try:
        from . import runtime

        _set_name(RUNTIME_NAME)
        root = request["root"]
        os.chdir(root)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = root  # what ``python -m`` puts first: the folder it runs in
        importlib.invalidate_caches()
        listen, lifeline, ready = fds
    except BaseException:
        traceback.print_exc()
        os._exit(70)
    try:
        code = runtime.main(["--app", request["app"], "--listen-fd", str(listen), "--lifeline-fd", str(lifeline),
                             "--ready-fd", str(ready)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # never back into the code the template was forked from
        traceback.print_exc()
        code = 1
    runtime.exit_now(code)


def _become_template(control: socket.socket, node: int) -> NoReturn:
    """In a child forked from the node before it started any thread: serve as the template.
    Never returns, whatever happens: returning would run the rest of the node's command here."""
    try:
        set_parent_death_signal()
        if os.getppid() != node:  # the node died before the signal was armed
            os._exit(0)
        _set_name(TEMPLATE_NAME)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        job = _serve(control, preload_list())  # what the node had not imported comes while idle
    except BaseException:
        traceback.print_exc()
        os._exit(70)
    if job is None:
        os._exit(0)
    _run_child(*job)


def _report_failures(failures: list[str]) -> None:
    for failure in failures:
        print(f"flask-immutant: runtime template: not preloaded: {failure}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(args[0]))
    _set_name(TEMPLATE_NAME)
    names = preload_list()
    first = len(names) - len(PRELOAD_LATER)
    _report_failures(preload(names[:first]))
    job = _serve(control, names[first:])
    if job is None:
        os._exit(0)  # the node is gone or done: nothing to flush, and tearing down all modules takes long
    return _run_child(*job)


if __name__ == "__main__":
    sys.exit(main())
