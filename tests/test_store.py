"""The cluster store: the embedded redis-server shared by a machine's nodes, and store URLs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from flask_immutant.errors import StoreUnavailableError
from flask_immutant.store import EmbeddedStore, client_from_url, describe_url, store_url
from flask_immutant.store.embedded import MAX_SOCKET_PATH, redis_server_binary

from support import free_port_base, invoke_flask, pid_alive, run_flask, stop_embedded_store, wait_until


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
def redis_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A real redis-server on a loopback TCP port with a password, for URL and AUTH tests."""
    port = free_port_base(0)
    password = "s3cret"
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", password, "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, password=password)
        wait_until(lambda: _pings(client), timeout=10)
        client.close()
        yield port, password
    finally:
        proc.kill()
        proc.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_the_first_node_starts_the_store_and_the_second_attaches(own_home, start_node, node_env):
    # Given no store running under a fresh home
    env = {"IMMUTANT_HOME": str(own_home)}
    store = EmbeddedStore(own_home)
    assert not store.is_running()
    # When two nodes start
    first = start_node("--clustered", env=env)
    first.wait_for("joined cluster")
    store_pid = store.pid()
    second = start_node("--clustered", "--port-offset", "100", env=env)
    second.wait_for("joined cluster")
    # Then there is one server, started by the first, on a private socket, persisting with AOF
    assert store.pid() == store_pid
    status = store.status()
    assert status["running"] and status["aof"]
    assert oct(store.socket.stat().st_mode & 0o777) == "0o700"
    # And killing the node that started it does not take the store (or the cluster) down
    first.signal(signal.SIGKILL)
    first.wait()
    assert pid_alive(store_pid)  # type: ignore[arg-type]
    assert store.is_running()
    result = run_flask(["immutant", "status", "--json"], {**node_env, **env})
    assert result.returncode == 0, result.stderr
    second.wait_for("member left")  # the second node still heartbeats and saw the first go


def test_concurrent_starts_make_one_server(own_home):
    import threading

    urls: list[str] = []
    threads = [threading.Thread(target=lambda: urls.append(EmbeddedStore(own_home).ensure_running())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(urls)) == 1
    result = subprocess.run(["pgrep", "-f", f"unixsocket {own_home}"], capture_output=True, text=True, check=False)
    assert len(result.stdout.split()) <= 1


def test_the_store_keeps_data_across_a_restart(own_home):
    store = EmbeddedStore(own_home)
    store.ensure_running()
    with contextlib.closing(store.client()) as client:
        client.set("kept", "yes")
    assert store.stop()
    assert not store.is_running()
    store.ensure_running()
    with contextlib.closing(store.client()) as client:
        assert client.get("kept") == b"yes"


def test_a_stale_socket_file_does_not_prevent_a_start(own_home):
    store = EmbeddedStore(own_home)
    store.dir.mkdir(parents=True)
    store.socket.write_text("left over by a crash")
    store.ensure_running()
    assert store.is_running()


def test_a_deep_home_gets_a_short_socket_in_a_private_folder():
    deep = Path("/tmp") / ("d" * 120)
    store = EmbeddedStore(deep)
    assert len(str(store.socket)) <= MAX_SOCKET_PATH
    folder = store.socket.parent.lstat()
    assert folder.st_uid == os.geteuid() and folder.st_mode & 0o777 == 0o700
    assert EmbeddedStore(Path("/tmp") / ("e" * 120)).socket != store.socket


def test_store_status_and_stop_commands(own_home):
    env = {"IMMUTANT_HOME": str(own_home)}
    # status without a running store says so and does not start one
    result = invoke_flask(["immutant", "store", "status"], env)
    assert result.returncode == 0 and "not running" in result.stdout
    assert not EmbeddedStore(own_home).is_running()
    EmbeddedStore(own_home).ensure_running()
    result = invoke_flask(["immutant", "store", "status"], env)
    assert "embedded store: running valkey" in result.stdout and "aof=on" in result.stdout
    result = invoke_flask(["immutant", "store", "stop"], env)
    assert result.returncode == 0 and "stopped" in result.stdout
    assert not EmbeddedStore(own_home).is_running()


def test_status_without_any_store_is_a_clear_error(own_home):
    result = invoke_flask(["immutant", "status"], {"IMMUTANT_HOME": str(own_home)})
    assert result.returncode == 1
    assert "no cluster store is running" in result.stderr
    assert "Traceback" not in result.stderr
    assert not EmbeddedStore(own_home).is_running()


def test_redis_url_with_password_authenticates(redis_server):
    port, password = redis_server
    client = client_from_url(f"redis://:{password}@127.0.0.1:{port}/2")
    assert client.ping()
    assert client.connection_pool.connection_kwargs["db"] == 2
    client.close()
    with pytest.raises(redis.AuthenticationError):
        client_from_url(f"redis://:wrong@127.0.0.1:{port}/0").ping()


def test_unix_url_connects(embedded_store):
    client = client_from_url(embedded_store.url)
    assert client.ping()
    client.close()


def test_our_clients_name_redis_py_and_its_version_to_the_server(embedded_store):
    # As redis-py's default, which reads the version from the installed distributions per connection
    for client in (client_from_url(embedded_store.url), embedded_store.client()):
        with contextlib.closing(client):
            info = client.client_info()
        assert (info["lib-name"], info["lib-ver"]) == ("redis-py", redis.__version__)
    # And a name the caller gives, in the URL or as an option, is the one the server sees
    from redis.driver_info import DriverInfo

    for client in (client_from_url(f"{embedded_store.url}?lib_name=shop"),
                   client_from_url(embedded_store.url, driver_info=DriverInfo(name="shop"))):
        with contextlib.closing(client), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # redis-py 8 deprecates lib_name, still honours it
            assert client.client_info()["lib-name"] == "shop"


def test_rediss_url_uses_tls():
    client = client_from_url("rediss://127.0.0.1:6390/0?ssl_cert_reqs=none")
    assert client.connection_pool.connection_class is redis.SSLConnection
    client.close()


def test_sentinel_url_finds_the_master(redis_server, tmp_path):
    # Given a real sentinel watching a real master (both redis-server from the wheel)
    port, password = redis_server
    sentinel_port = free_port_base(0)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {port} 1\n"
        f"sentinel auth-pass mymaster {password}\n"
    )
    proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = redis.Redis(port=sentinel_port)
        wait_until(lambda: _pings(probe), timeout=10)
        before = len(probe.client_list())
        # When a client is made from the sentinel URL form
        client = client_from_url(f"redis+sentinel://:{password}@127.0.0.1:{sentinel_port}/mymaster/3")
        # Then it talks to the master, authenticated, in the db from the URL
        client.set("via-sentinel", "1")
        direct = redis.Redis(port=port, password=password, db=3)
        assert direct.get("via-sentinel") == b"1"
        direct.close()
        # (it asked the Sentinel, and listens there for failovers)
        wait_until(lambda: len(probe.client_list()) == before + 2, timeout=5, message="two Sentinel connections")
        # And closing it closes its connection to the Sentinel too
        client.close()
        wait_until(lambda: len(probe.client_list()) == before, timeout=5, message="the Sentinel connection closed")
        probe.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_command_waiting_on_a_lost_primary_goes_to_the_promoted_replica(tmp_path):
    # Given a primary, its replica and a Sentinel, and a client that never gives up on a reply
    import threading

    primary_port, replica_port, sentinel_port = (free_port_base(0) for _ in range(3))
    def server(port: int, *args: str) -> subprocess.Popen[bytes]:
        folder = tmp_path / str(port)
        folder.mkdir()
        return subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--dir", str(folder), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = [server(primary_port), server(replica_port, "--replicaof", "127.0.0.1", str(primary_port))]
    client = None
    try:
        replica = redis.Redis(port=replica_port)
        wait_until(lambda: _replicating(replica), timeout=20, message="the replica is in sync")
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {primary_port} 1\n"
                        "sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n")
        procs.append(subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        sentinel = redis.Redis(port=sentinel_port)
        wait_until(lambda: _knows_replicas(sentinel), timeout=20, message="the Sentinel knows the replica")
        client = client_from_url(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster", socket_timeout=None)
        client.set("k", "1")
        # When the primary stops answering (frozen, as a partition leaves it) with a command in flight
        os.kill(procs[0].pid, signal.SIGSTOP)
        replies: list[object] = []

        def incr() -> None:
            try:
                replies.append(client.incr("k"))
            except Exception as exc:
                replies.append(exc)

        waiting = threading.Thread(target=incr, daemon=True)
        waiting.start()
        # Then the Sentinel promotes the replica, and the command is answered there
        wait_until(lambda: replies, timeout=30, message="the command in flight is answered after the promotion")
        assert replies == [2] and replica.get("k") == b"2"
        assert replica.info("replication")["role"] == "master"
        replica.close()
        sentinel.close()
    finally:
        os.kill(procs[0].pid, signal.SIGCONT)
        for proc in procs:
            proc.kill()
            proc.wait()
        if client is not None:
            client.close()


def _replicating(replica: redis.Redis) -> bool:
    try:
        return replica.info("replication").get("master_link_status") == "up"
    except redis.RedisError:
        return False


def _knows_replicas(sentinel: redis.Redis) -> bool:
    try:
        return len(sentinel.execute_command("SENTINEL", "replicas", "mymaster")) == 1
    except redis.RedisError:
        return False


def test_passwords_are_masked_in_descriptions():
    assert describe_url("redis://:hunter2@host:6379/0") == "redis://:***@host:6379/0"
    assert describe_url("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_store_url_without_start_raises_when_nothing_runs(own_home):
    settings = {"IMMUTANT_REDIS_URL": None, "IMMUTANT_HOME": str(own_home)}
    with pytest.raises(StoreUnavailableError, match="no cluster store is running"):
        store_url(settings, start=False)
    assert store_url({"IMMUTANT_REDIS_URL": "redis://x:1/0", "IMMUTANT_HOME": "/nowhere"}, start=False) == "redis://x:1/0"


def test_a_node_on_an_external_redis_url_uses_it(redis_server, start_node, node_env):
    port, password = redis_server
    url = f"redis://:{password}@127.0.0.1:{port}/1"
    node = start_node("--clustered", env={"IMMUTANT_REDIS_URL": url})
    node.wait_for("joined cluster")
    assert ":***@" in node.lines[0] and password not in node.lines[0]
    direct = redis.Redis(port=port, password=password, db=1)
    wait_until(lambda: direct.hlen(f"immutant:{node_env['IMMUTANT_CLUSTER']}:members") == 1, timeout=5)
    direct.close()


def test_nodes_bring_a_killed_embedded_store_back(own_home, start_node, node_env):
    # Given a node on the embedded store, with a key written
    env = {"IMMUTANT_HOME": str(own_home)}
    node = start_node("--clustered", env=env)
    node.wait_for("joined cluster")
    store = EmbeddedStore(own_home)
    with contextlib.closing(store.client()) as client:
        client.set("survives", "1")
        client.execute_command("CONFIG", "SET", "appendfsync", "always")
        client.set("survives", "2")
    # When the store process is killed outright
    old_pid = store.pid()
    os.kill(old_pid, signal.SIGKILL)  # type: ignore[arg-type]
    # Then the node starts it again, the data comes back from the AOF, and the node is a member again
    wait_until(lambda: store.is_running() and store.pid() != old_pid, timeout=10)
    with contextlib.closing(store.client()) as client:
        assert client.get("survives") == b"2"
    wait_until(lambda: '"name"' in run_flask(["immutant", "status", "--json"], {**node_env, **env}).stdout, timeout=5)


def test_one_rule_says_which_store_errors_are_outages() -> None:
    from redis.sentinel import MasterNotFoundError

    from flask_immutant.store.outage import is_outage

    assert is_outage(MasterNotFoundError("No master found for 'mymaster'"))
    assert is_outage(redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"))
    assert is_outage(redis.ResponseError("NOREPLICAS Not enough good replicas to write."))
    assert is_outage(redis.ResponseError("Error running script (call to f_1): @user_script:1: @user_script: 1: "
                                         "-READONLY You can't write against a read only replica."))
    assert is_outage(redis.ResponseError("Command # 1 (DEL k) of pipeline caused error: BUSY Redis is busy"))
    assert not is_outage(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert not is_outage(redis.ResponseError("ERR unknown command 'BUSYX'"))


def test_contract_redis_py_connections_expose_the_socket_they_read(store_client, tcp_redis) -> None:
    """``Subscription`` (store/connect.py) waits on, and shuts down, the socket of its pub/sub
    connection, and the near cache's tracker (caching/near.py) polls its connection's: both read
    redis-py's ``Connection._sock``, which is not its API. Pinned here on both transports."""
    import select
    import socket

    for client in (store_client, redis.Redis.from_url(tcp_redis.url)):
        pubsub = client.pubsub()
        try:
            pubsub.subscribe("contract")
            sock = pubsub.connection._sock
            assert isinstance(sock, socket.socket)
            assert pubsub.get_message(timeout=1)["type"] == "subscribe"
            client.publish("contract", "hello")
            readable, _, _ = select.select([sock], [], [], 5)
            assert readable and pubsub.get_message(timeout=1)["data"] == b"hello"
            assert pubsub.connection.can_read(timeout=0) is False
        finally:
            pubsub.close()
            if client is not store_client:
                client.close()
