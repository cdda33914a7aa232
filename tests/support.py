"""Helpers for tests that run real processes: node subprocesses, polling with a deadline."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

T = TypeVar("T")

#: Wall-clock upper bounds in tests are multiplied by this (a shared or slow machine, parallel
#: workers); bounds that tell one mechanism from another (a release from a TTL expiry) are not.
TIME_SLACK = float(os.environ.get("TEST_TIME_SLACK", "2"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip locally with the reason; fail in CI (CI=true), where everything a test needs must be there."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(reason)


def within(seconds: float) -> float:
    """An upper bound of ``seconds`` on wall-clock time, with the suite's slack."""
    return seconds * TIME_SLACK


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, message: str = "") -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``message`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last  # type: ignore[no-any-return]
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message or condition} (last: {last!r})")


def free_port_base(span: int = 200) -> int:
    """A base port such that base, base+100 and base+200 are free now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + span > 65000:
            continue
        if all(port_is_free(base + offset) for offset in range(0, span + 1, 100)):
            return base
    raise RuntimeError("no free port base found")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state to be sure.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def descendants_of(pid: int) -> list[int]:
    """Children of ``pid``, their children and so on (Linux /proc)."""
    found, pending = [], [pid]
    while pending:
        for child in children_of(pending.pop()):
            found.append(child)
            pending.append(child)
    return found


def process_name(pid: int) -> str | None:
    """The process's name (``comm``), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def runtimes_of(node_pid: int) -> list[int]:
    """A node's app runtimes: its descendants, without the runtime template they fork from
    (``server/zygote.py``); started as fresh interpreters they are its children."""
    return [p for p in descendants_of(node_pid) if process_name(p) not in ("immutant-tmpl", None)]  # None: gone


def template_of(node_pid: int) -> list[int]:
    """A node's runtime template process, if it has one."""
    return [p for p in children_of(node_pid) if process_name(p) == "immutant-tmpl"]


class NodeProcess:
    """A ``flask immutant ...`` subprocess whose output is collected line by line; ``prefix``
    runs it through a wrapper that execs it (``ip netns exec NS``), so the pid is still flask's."""

    def __init__(self, args: Sequence[str], env: dict[str, str], cwd: str | Path | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.args = list(args)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "flask", *args],
            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.proc.poll() is not None:
                time.sleep(0.1)  # let the reader drain the last lines
                for line in list(self.lines):
                    match = regex.search(line)
                    if match:
                        return match
                raise AssertionError(f"process exited ({self.proc.returncode}) before {pattern!r}:\n{self.output}")
            return None

        return wait_until(found, timeout, message=f"{pattern!r} in output of {self.args}:\n{self.output}")

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(2)
        return code

    def cleanup(self) -> None:
        """Terminate, then kill, the node and anything left in its session."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._reader.join(2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


#: An example app's listener line. A runtime's threads print to one pipe, and ``print`` writes a
#: line and its newline apart, so another thread's line can land between them: match, not split.
RECEIVED = re.compile(r"received: (\d+)")


def received(node: Any) -> list[int]:
    """The counts an example app's listener printed on ``node``, in order."""
    return [int(match.group(1)) for line in list(node.lines) for match in RECEIVED.finditer(line)]


def run_flask(args: Sequence[str], env: dict[str, str], cwd: str | Path | None = None,
              timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m flask ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "flask", *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )


def invoke_flask(args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``flask ARGS`` in this process through Flask's CLI runner, for commands that need no
    process of their own (listings, status, errors): what :func:`run_flask` returns, faster."""
    from click.testing import CliRunner
    from flask.cli import cli

    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(["flask", *args], result.exit_code, result.stdout, result.stderr)


def stop_embedded_store(store: Any) -> None:
    """Stop an embedded store a test started, and make sure its process is gone."""
    pid = store.pid()
    with contextlib.suppress(Exception):
        store.stop(timeout=5)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


#: Apps made by in-process tests; conftest closes their store clients after each test.
TRACKED_APPS: list[Any] = []


def track(app: T) -> T:
    """Have the app's store client closed after the test (no socket left to the collector)."""
    TRACKED_APPS.append(app)
    return app


#: Error replies a live store gives while it cannot serve, and how ``store_refusing`` provokes them.
REFUSALS = ("NOREPLICAS", "READONLY", "MASTERDOWN", "BUSY")


@contextlib.contextmanager
def store_refusing(socket_path: str | Path, reply: str) -> Iterator[None]:
    """Make a real redis-server answer ``reply`` (one of :data:`REFUSALS`) while inside."""
    admin = redis.Redis(unix_socket_path=str(socket_path))
    busy: threading.Thread | None = None
    try:
        if reply == "NOREPLICAS":  # a primary that lost the replicas its writes need
            admin.config_set("min-replicas-to-write", 1)
        elif reply in ("READONLY", "MASTERDOWN"):  # demoted, its primary unreachable
            admin.config_set("replica-serve-stale-data", "yes" if reply == "READONLY" else "no")
            admin.replicaof("127.0.0.1", free_port_base(1))
        elif reply == "BUSY":  # a script running past lua-time-limit
            admin.config_set("lua-time-limit", 10)
            script = "local t = redis.call('time')[1] + 30 while redis.call('time')[1] + 0 < t do end return 1"
            runner = redis.Redis(unix_socket_path=str(socket_path))
            busy = threading.Thread(target=_swallow, args=(lambda: runner.eval(script, 0),), daemon=True)
            busy.start()
            wait_until(lambda: _replies_busy(admin), timeout=5, message="the store to answer BUSY")
        yield
    finally:
        if busy is not None:
            wait_until(lambda: _swallow(admin.script_kill) or not busy.is_alive(), timeout=10)
            wait_until(lambda: _swallow(admin.ping), timeout=10)
            admin.config_set("lua-time-limit", 5000)
        if reply in ("READONLY", "MASTERDOWN"):
            admin.replicaof("NO", "ONE")
            admin.config_set("replica-serve-stale-data", "yes")
        if reply == "NOREPLICAS":
            admin.config_set("min-replicas-to-write", 0)
        admin.close()


def _swallow(call: Callable[[], Any]) -> bool:
    try:
        call()
    except redis.RedisError:
        return False
    return True


def _replies_busy(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


class HoldingProxy:
    """A unix-socket proxy in front of a real store that can hold back one reply.

    :meth:`hold` arms it: the next request whose bytes contain ``marker`` is forwarded, and its
    reply is kept until :meth:`release`; the returned event is set once the reply is held. So a
    test knows that the client has sent its request and is waiting for the answer, and can tear
    the client's connection down under the reader at that moment (what another thread closing the
    pool does), with the store itself untouched."""

    def __init__(self, target: str | Path, folder: str | Path) -> None:
        self.target = str(target)
        self.path = str(Path(folder) / "proxy.sock")
        self.url = f"unix://{self.path}"
        self._marker: bytes | None = None
        self._held = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        threading.Thread(target=self._accept, daemon=True, name="holding-proxy").start()

    def hold(self, marker: bytes) -> threading.Event:
        with self._lock:
            self._marker = marker
            self._held.clear()
            self._release.clear()
        return self._held

    def release(self) -> None:
        self._release.set()

    def torn_down_under(self, client: redis.Redis, marker: bytes, call: Callable[[], T]) -> T | Exception:
        """``call()`` on a thread of its own; while it waits for the reply to its command containing
        ``marker``, another thread disconnects every connection of ``client``'s pool (as a discarded
        client's ``close()`` did in CI), so redis-py's parser fails on the closed buffer with no
        redis error. Returns what ``call`` returned, or the exception it raised."""
        held = self.hold(marker)
        outcome: list[T | Exception] = []

        def run() -> None:
            try:
                outcome.append(call())
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            assert held.wait(10), f"no request with {marker!r} reached the store"
            client.connection_pool.disconnect()
        finally:
            self.release()
            thread.join(30)
        assert outcome, "the call did not finish"
        return outcome[0]

    def close(self) -> None:
        self._release.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self.target)
            except OSError:  # the store is down: so is the client's connection
                server.close()
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            holding = threading.Event()  # this connection's next reply is to be held
            threading.Thread(target=self._requests, args=(client, server, holding), daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client, holding), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, holding: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    if self._marker is not None and self._marker in data:
                        self._marker = None
                        holding.set()
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)

    def _replies(self, server: socket.socket, client: socket.socket, holding: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if holding.is_set():
                    holding.clear()
                    self._held.set()
                    self._release.wait(30)
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)


def rabbitmq_queue_counts(queue: str) -> tuple[int, int, int]:
    """(ready, unacknowledged, consumers) of a RabbitMQ queue, as the server counts them."""
    import shutil

    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        unavailable("rabbitmqctl is not installed: the server's unacknowledged count cannot be read")
    out = subprocess.run([str(ctl), "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged",
                          "consumers"], capture_output=True, text=True, timeout=60, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == queue:
            return int(fields[1]), int(fields[2]), int(fields[3])
    raise AssertionError(f"queue {queue} not found:\n{out}")
