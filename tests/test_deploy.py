"""`flask immutant deploy`: every node deploys, redeploy without failed requests, failures,
undeploy, archives, signatures and the deployments folder — on real nodes."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import py_compile
import signal
import socket
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_immutant.deploy import archive
from flask_immutant.deploy.records import Deployment, DeploymentError, sign, verify
from flask_immutant.keys import Keys

from support import pid_alive, run_flask, runtimes_of, wait_until, within

APP = '''
import os, threading
from flask import Flask, current_app
from flask_immutant import ImmutantExtension, daemons, get_state

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)
VERSION = {version!r}
if os.environ.get("_IMMUTANT_DEPLOYMENT") and VERSION == "broken":
    raise RuntimeError("this version cannot start on a node")
stopping = threading.Event()

def run():
    stopping.clear()
    ctx = daemons.current()
    get_state().store.set(get_state().keys.prefix + "test:daemon", get_state().node_name)
    while not ctx.wait(0.1):
        pass

def stop():
    stopping.set()
    get_state().store.incr(get_state().keys.prefix + "test:stopped")

daemons.start("worker", run, stop, app=app)

@app.get("/")
def index():
    return {{"version": VERSION, "node": get_state().node_name, "file": __file__,
             "greeting": current_app.config.get("GREETING"), "path": __import__("flask").request.path}}
'''


def write_app(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(APP.format(version=version))
    return folder


def get(port: int, path: str = "/") -> dict[str, Any] | None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=3)
    except requests.ConnectionError:
        return None
    return response.json() if response.status_code == 200 else None


@pytest.fixture
def two_nodes(start_node, node_env):
    a = start_node("--clustered", "--node-name", "a")
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100")
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    return {"a": a, "b": b, "ports": {"a": base, "b": base + 100}}


def deploy(env: dict[str, str], cwd: Path, *args: str) -> Any:
    return run_flask(["immutant", "deploy", *args], env, cwd=cwd)


def test_deploy_from_the_app_folder_reaches_every_node(two_nodes, node_env, tmp_path, start_node):
    # Given two running nodes with no app, and an app folder
    folder = write_app(tmp_path / "shop", "1")
    # When `flask immutant deploy` runs inside the folder (no --app)
    result = deploy(node_env, folder)
    assert result.returncode == 0, result.stdout + result.stderr
    # Then both nodes serve it within 2 s, under the folder's name
    for port in two_nodes["ports"].values():
        wait_until(lambda port=port: get(port), timeout=within(10))
    assert "deployment shop v1 registered" in result.stdout
    listing = json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)
    (row,) = listing
    assert row["name"] == "shop" and {n: s["state"] for n, s in row["nodes"].items()} == {"a": "deployed",
                                                                                          "b": "deployed"}
    # And a node started later deploys what is registered
    c = start_node("--clustered", "--node-name", "c", "--port-offset", "200")
    c.wait_for("deployed shop v1", timeout=15)
    assert get(int(node_env["IMMUTANT_HTTP_PORT"]) + 200)["version"] == "1"  # type: ignore[index]


def test_a_redeploy_never_runs_the_bytecode_of_the_version_before(two_nodes, node_env, tmp_path):
    # Given version 1 deployed from a folder, with its bytecode written in second S of the clock
    folder = write_app(tmp_path / "shop", "1")
    second = int(time.time()) - 10
    os.utime(folder / "app.py", ns=(second * 10**9, second * 10**9))
    pyc = Path(py_compile.compile(str(folder / "app.py"), doraise=True))
    os.utime(pyc, ns=((second * 10**9) + 10**8, (second * 10**9) + 10**8))  # written at S + 0.1 s
    assert deploy(node_env, folder).returncode == 0
    port = two_nodes["ports"]["a"]
    wait_until(lambda: (get(port) or {}).get("version") == "1", timeout=30)
    # When version 2, the same size, is saved later in that second (so the .pyc's header, which
    # holds the source's whole seconds and size, still matches it) and deployed
    write_app(folder, "2")
    os.utime(folder / "app.py", ns=((second * 10**9) + 5 * 10**8, (second * 10**9) + 5 * 10**8))
    result = deploy(node_env, folder)
    assert result.returncode == 0, result.stdout + result.stderr
    # Then every node serves version 2, not the bytecode of version 1
    for node_port in two_nodes["ports"].values():
        wait_until(lambda p=node_port: (get(p) or {}).get("version") == "2", timeout=30,
                   message=f"version 2 served on port {node_port}, not version 1's bytecode")


def test_redeploy_under_load_fails_no_request(two_nodes, node_env, tmp_path):
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    port = two_nodes["ports"]["a"]
    wait_until(lambda: get(port), timeout=5)
    # Given a steady stream of keep-alive requests through node a
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.get(f"http://127.0.0.1:{port}/", timeout=5)
                ok = response.status_code == 200
                results.append(response.json()["version"] if ok else f"HTTP {response.status_code}")
            except requests.RequestException as exc:
                results.append(f"error {exc}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # When the app is redeployed twice
        for version in ("2", "3"):
            write_app(folder, version)
            assert deploy(node_env, folder).returncode == 0
            wait_until(lambda version=version: results and results[-1] == version, timeout=10)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    # Then every request succeeded, and the new version serves
    failures = [r for r in results if r not in ("1", "2", "3")]
    assert not failures, failures[:5]
    assert len(results) > 50 and results[-1] == "3"


def test_a_keep_alive_connection_idle_when_a_redeploy_begins_is_answered_not_dropped(two_nodes, node_env,
                                                                                     tmp_path):
    """A client between two requests on a kept-alive connection is the common case, not a corner
    one: the draining runtime must answer its next request (saying ``Connection: close``), not
    close the connection under it (the client's request then dies with it)."""
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    port = two_nodes["ports"]["a"]
    wait_until(lambda: get(port), timeout=within(10))
    # Given clients that keep their connection open and pause 20 ms between requests
    answers: list[str] = []
    stop = threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                answers.append(json.loads(response.read())["version"])
            except (OSError, http.client.HTTPException) as exc:  # the connection was dropped under us
                answers.append(f"error {exc!r}")
                connection.close()
            time.sleep(0.4)
        connection.close()

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: len(answers) > 20, timeout=within(10))
        # When the app is redeployed twice
        for version in ("2", "3"):
            write_app(folder, version)
            assert deploy(node_env, folder).returncode == 0
            wait_until(lambda version=version: answers.count(version) > 3, timeout=within(10))
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    # Then no request of theirs failed
    assert [answer for answer in answers if answer not in ("1", "2", "3")] == []


def test_empty_requests_cannot_keep_a_draining_runtime_past_its_grace(start_node, node_env, tmp_path):
    """The grace above counts from the connection's last activity; a client sending bare CRLFs
    (which waitress reads as empty requests) stays "active" for ever, and would hold the old
    runtime until the shutdown timeout (here 60 s) on every redeploy."""
    _, folder, port, old = shop_node(start_node, node_env, tmp_path, IMMUTANT_SHUTDOWN_TIMEOUT="60")
    # Given a kept-alive connection to it that sends an empty request (CRLF CRLF) every 0.2 s
    trickle = socket.create_connection(("127.0.0.1", port), timeout=5)
    trickle.sendall(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
    assert trickle.recv(65536).startswith(b"HTTP/1.1 200")
    stop = threading.Event()

    def keep_sending() -> None:
        with contextlib.suppress(OSError):
            while not stop.wait(0.2):
                trickle.sendall(b"\r\n\r\n")

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        # When the app is redeployed
        write_app(folder, "2")
        assert deploy(node_env, folder).returncode == 0
        # Then the old runtime is gone well before its shutdown timeout
        wait_until(lambda: not pid_alive(old), timeout=within(10), message="the old runtime exited")
    finally:
        stop.set()
        sender.join()
        trickle.close()


def test_a_failing_deployment_is_reported_and_a_fixed_one_recovers(two_nodes, node_env, tmp_path, store_client,
                                                                   cluster_name):
    # Given a good app at / and one that cannot start on a node, at /broken
    good = write_app(tmp_path / "good", "1")
    assert deploy(node_env, good).returncode == 0
    bad = write_app(tmp_path / "bad", "broken")
    result = deploy(node_env, bad, "--context-path", "/broken")
    # Then the deploy command says so, with the error, and exits non-zero
    assert result.returncode == 1
    assert "this version cannot start on a node" in result.stdout
    assert "Traceback" not in result.stderr
    listing = {row["name"]: row for row in json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)}
    assert {s["state"] for s in listing["bad"]["nodes"].values()} == {"failed"}
    # And the nodes and the good deployment keep running
    assert get(two_nodes["ports"]["a"])["version"] == "1"  # type: ignore[index]
    two_nodes["a"].wait_for("deployment bad v1 failed on a")
    # When the app is fixed and redeployed, it recovers
    write_app(bad, "2")
    result = deploy(node_env, bad, "--context-path", "/broken")
    assert result.returncode == 0, result.stdout
    row = json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)
    port = next(r for r in row if r["name"] == "bad")["nodes"]["a"]["port"]
    assert get(port, "/broken/")["path"] == "/"  # type: ignore[index]


def test_undeploy_stops_everything_everywhere(two_nodes, node_env, tmp_path, store_client, cluster_name):
    keys = Keys(cluster_name)
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    wait_until(lambda: store_client.get(keys.lease("daemon:worker")), timeout=10)
    states = json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)[0]["nodes"]
    pids = [state["pid"] for state in states.values()]
    # When it is undeployed
    result = run_flask(["immutant", "undeploy", "shop"], node_env)
    assert result.returncode == 0 and "undeployed shop" in result.stdout
    # Then the daemon's stop function ran, its lease is released (not handed over), the runtimes exited
    assert int(store_client.get(keys.prefix + "test:stopped") or 0) >= 1
    wait_until(lambda: store_client.get(keys.lease("daemon:worker")) is None, timeout=2)
    time.sleep(0.5)
    assert store_client.get(keys.lease("daemon:worker")) is None
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=5)
    assert json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout) == []
    assert get(two_nodes["ports"]["a"]) is None
    # And undeploying an unknown name is one clear line
    result = run_flask(["immutant", "undeploy", "shop"], node_env)
    assert result.returncode == 1 and "no deployment named 'shop'" in result.stderr


def test_archive_deployments_run_from_the_nodes_own_copy(two_nodes, node_env, tmp_path, immutant_home):
    folder = write_app(tmp_path / "shipped", "1")
    result = deploy(node_env, folder, "--archive", "--set", "GREETING=hello")
    assert result.returncode == 0, result.stdout + result.stderr
    served = wait_until(lambda: get(two_nodes["ports"]["b"]), timeout=5)
    assert served["file"].startswith(str(immutant_home / "nodes" / "b" / "apps" / "shipped"))
    assert served["greeting"] == "hello"


def test_a_tampered_or_unsigned_record_is_refused(two_nodes, node_env, tmp_path, store_client, cluster_name):
    keys = Keys(cluster_name)
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    envelope = json.loads(store_client.hget(keys.deployments, "shop"))
    envelope["record"]["import_path"] = "os:system"
    envelope["record"]["version"] += 1
    store_client.hset(keys.deployments, "shop", json.dumps(envelope))
    store_client.hset(keys.deployments, "unsigned", json.dumps({"record": {"name": "unsigned"}}))
    store_client.publish(keys.deployments_changed, "shop")
    two_nodes["a"].wait_for("refusing deployment shop: deployment 'shop' has a bad signature")
    two_nodes["a"].wait_for("refusing deployment unsigned")
    listing = {row["name"]: row for row in json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)}
    assert "bad signature" in listing["shop"]["error"]
    assert get(two_nodes["ports"]["a"])["version"] == "1"  # type: ignore[index]  # still the good one


def test_bad_set_values_are_one_line_errors(two_nodes, node_env, tmp_path):
    folder = write_app(tmp_path / "shop", "1")
    result = deploy(node_env, folder, "--set", "IMMUTANT_THREDS=4")
    assert result.returncode == 1 and "did you mean IMMUTANT_THREADS" in result.stderr
    result = deploy(node_env, folder, "--set", "IMMUTANT_THREADS=lots")
    assert result.returncode == 1 and "IMMUTANT_THREADS='lots'" in result.stderr
    result = deploy(node_env, folder, "--set", "novalue")
    assert result.returncode == 1 and "expected KEY=VALUE" in result.stderr


def test_a_descriptor_dropped_in_the_deployments_folder_deploys(two_nodes, node_env, tmp_path, immutant_home):
    folder = write_app(tmp_path / "dropped", "1")
    deployments = immutant_home / "deployments"
    deployments.mkdir(exist_ok=True)
    name = f"dropped-{node_env['IMMUTANT_CLUSTER']}"
    descriptor = deployments / f"{name}.json"
    # The shared home is used by every test's cluster: keep this descriptor to this test's cluster
    descriptor.write_text(json.dumps({"root": str(folder), "app": "app"}))
    try:
        wait_until(lambda: get(two_nodes["ports"]["a"]), timeout=10)
        assert json.loads((deployments / f"{name}.json.deployed").read_text())["version"] == 1
        descriptor.unlink()
        wait_until(lambda: get(two_nodes["ports"]["a"]) is None, timeout=10)
        bad = deployments / f"bad-{node_env['IMMUTANT_CLUSTER']}.json"
        bad.write_text(json.dumps({"root": "relative/path"}))
        wait_until(lambda: (deployments / f"{bad.name}.failed").exists(), timeout=10)
        assert "absolute path" in (deployments / f"{bad.name}.failed").read_text()
    finally:
        for path in deployments.glob(f"*{node_env['IMMUTANT_CLUSTER']}*"):
            path.unlink()


# --- archives and signatures (pure) ---


def tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tarfile.TarInfo("/etc/passwd"), "absolute path"),
        (tarfile.TarInfo("../outside.py"), "climbs out"),
        (tarfile.TarInfo("a/../../outside.py"), "climbs out"),
    ],
)
def test_unsafe_archive_members_are_refused(member: tarfile.TarInfo, message: str, tmp_path):
    data = tar_with(member)
    import hashlib

    with pytest.raises(DeploymentError, match=message):
        archive.unpack(data, hashlib.sha256(data).hexdigest(), tmp_path / "out", 10_000)
    assert not (tmp_path / "out").exists()


def test_links_and_oversized_archives_are_refused(tmp_path):
    import hashlib

    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    data = tar_with(link)
    with pytest.raises(DeploymentError, match="link"):
        archive.check(data, hashlib.sha256(data).hexdigest(), 10_000)
    big = tarfile.TarInfo("big.bin")
    big.size = 5000
    data = tar_with(big, b"x" * 5000)
    with pytest.raises(DeploymentError, match="more than"):
        archive.check(data, hashlib.sha256(data).hexdigest(), 1000)
    with pytest.raises(DeploymentError, match="sha256"):
        archive.check(data, "0" * 64, 10_000)


def test_pack_and_unpack_round_trip(tmp_path):
    source = write_app(tmp_path / "src", "1")
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "x.pyc").write_bytes(b"junk")
    data, digest = archive.pack(source, 1_000_000)
    target = archive.unpack(data, digest, tmp_path / "dst", 1_000_000)
    assert (target / "app.py").read_text() == (source / "app.py").read_text()
    assert not (target / "__pycache__").exists()


def test_signatures_bind_every_field():
    record = Deployment(name="x", import_path="app", root="/srv/x", version=3, cluster="c1")
    signed = sign(record, b"k" * 32)
    assert verify(signed, b"k" * 32, name="x", cluster="c1") == record
    with pytest.raises(DeploymentError, match="bad signature"):
        verify(signed, b"other-secret-000000000000000000", name="x", cluster="c1")
    with pytest.raises(DeploymentError, match="malformed or unsigned"):
        verify("{}", b"k" * 32, name="x", cluster="c1")
    # And the record is bound to the name and cluster it was signed for
    with pytest.raises(DeploymentError, match="copied under another name"):
        verify(signed, b"k" * 32, name="y", cluster="c1")
    with pytest.raises(DeploymentError, match="copied from another cluster"):
        verify(signed, b"k" * 32, name="x", cluster="c2")


def test_a_redeploy_hands_singletons_from_the_old_runtime_to_the_new_at_once(start_node, node_env, tmp_path,
                                                                             store_client, cluster_name):
    keys = Keys(cluster_name)
    node = start_node("--clustered", "--node-name", "solo")
    node.wait_for("joined cluster")
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    first = json.loads(wait_until(lambda: store_client.get(keys.lease("daemon:worker")), timeout=10))
    # Watch the lease while the app is redeployed
    gaps: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        free_since = None
        while not stop.is_set():
            held = store_client.get(keys.lease("daemon:worker")) is not None
            now = time.monotonic()
            if not held and free_since is None:
                free_since = now
            elif held and free_since is not None:
                gaps.append(now - free_since)
                free_since = None
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        write_app(folder, "2")
        assert deploy(node_env, folder).returncode == 0
        second = json.loads(wait_until(
            lambda: (raw := store_client.get(keys.lease("daemon:worker"))) and json.loads(raw)["pid"] != first["pid"]
            and raw, timeout=10))
    finally:
        stop.set()
        watcher.join()
    # Then the new runtime holds it, with a larger token, after a gap far below the failure timeout
    assert second["fence"] > first["fence"]
    assert not gaps or max(gaps) < 0.5, gaps  # no gap at all is the best case: seen between two polls


GRACEFUL_APP = '''
import os
from flask import Flask
from flask_immutant import ImmutantExtension, daemons, get_state, messaging

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)
STOPPED = get_state(app).keys.prefix + "test:stopped"

def run():
    ctx = daemons.current()
    while not ctx.wait(0.05):
        pass

def stop():
    get_state().store.rpush(STOPPED, get_state().node_name)

daemons.start("worker", run, stop, app=app)

messaging.start("/queue/work", app=app)

@messaging.listen("/queue/work", app=app)
def work(body):
    pass
'''


def test_sigterm_to_a_node_serving_a_deployed_app_is_graceful(two_nodes, node_env, tmp_path, store_client,
                                                               cluster_name):
    # Given two nodes that got an app with a singleton daemon and a consumer through `deploy`
    keys = Keys(cluster_name)
    folder = tmp_path / "graceful"
    folder.mkdir()
    (folder / "app.py").write_text(GRACEFUL_APP)
    assert deploy(node_env, folder).returncode == 0
    for name in ("a", "b"):
        two_nodes[name].wait_for("deployed graceful v1", timeout=20)
        two_nodes[name].wait_for(r"messaging: consuming /queue/work", timeout=20)
    first = json.loads(wait_until(lambda: store_client.get(keys.lease("daemon:worker")), timeout=10))
    holder, survivor = first["node"], "b" if first["node"] == "a" else "a"
    # When the holder's node gets SIGTERM
    two_nodes[holder].signal(signal.SIGTERM)
    stopped = time.monotonic()
    second = json.loads(wait_until(
        lambda: (raw := store_client.get(keys.lease("daemon:worker"))) and json.loads(raw)["node"] == survivor
        and raw, timeout=10))
    handover = time.monotonic() - stopped
    print(f"handover after SIGTERM of the deployed holder: {handover:.3f}s")
    # Then its runtime stopped gracefully: the stop function ran and the lease was released, so the
    # survivor took over before the failure timeout (2 s) could explain it
    assert two_nodes[holder].wait(20) == 0
    assert [n.decode() for n in store_client.lrange(keys.prefix + "test:stopped", 0, -1)] == [holder]
    assert handover < 2.0
    assert second["fence"] > first["fence"]
    # And the survivor does not take the stopped node's consumer for dead
    time.sleep(2.5)  # past the failure timeout: a SIGKILLed runtime's heartbeat would have expired
    assert f"consumer {holder}." not in two_nodes[survivor].output
    assert not [c for c in store_client.smembers(keys.messaging_consumers) if c.decode().startswith(f"{holder}.")]


def test_sigkill_of_a_node_takes_its_deployed_runtimes_along(two_nodes, node_env, tmp_path):
    # Given a node whose runtime came through `deploy` (spawned for the deployer, not the main thread)
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    two_nodes["a"].wait_for("deployed shop v1", timeout=20)
    runtimes = wait_until(lambda: runtimes_of(two_nodes["a"].pid), timeout=5)
    # When the node is SIGKILLed, then its runtimes die with it
    two_nodes["a"].signal(signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(pid) for pid in runtimes), timeout=3)


#: Shutdown and idle timeouts long enough that only the test's client ends a drain.
HELD = {"IMMUTANT_SHUTDOWN_TIMEOUT": "600", "IMMUTANT_HTTP_IDLE_TIMEOUT": "600"}


def shop_node(start_node: Callable[..., Any], node_env: dict[str, str], tmp_path: Path,
              **env: str) -> tuple[Any, Path, int, int]:
    """A node "a" serving shop v1, deployed: the node, the app's folder, its port, its runtime's pid."""
    node = start_node("--clustered", "--node-name", "a", env=env)
    node.wait_for("joined cluster")
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    wait_until(lambda: get(port), timeout=within(10))
    (runtime,) = runtimes_of(node.pid)
    return node, folder, port, runtime


def held_connection(port: int) -> socket.socket:
    """A client that keeps the runtime serving ``port`` draining while it stays connected: one
    request answered, then half a request head."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
    assert client.recv(65536).startswith(b"HTTP/1.1 200")
    client.sendall(b"GET / HTTP/1.1\r\nHost: sh")
    return client


def held_drain(start_node: Callable[..., Any], node_env: dict[str, str],
               tmp_path: Path) -> tuple[Any, int, socket.socket]:
    """A node whose shop v1 was replaced by v2 and still drains, held by a client that sent half
    a request head (for as long as it stays connected: the shutdown and idle timeouts are 600 s).
    Returns the node, the old runtime's pid and the client's socket."""
    node, folder, port, old = shop_node(start_node, node_env, tmp_path, **HELD)
    client = held_connection(port)  # the old runtime holds this connection
    write_app(folder, "2")
    deploy(node_env, folder)
    wait_until(lambda: (get(port) or {}).get("version") == "2", timeout=within(10))
    assert pid_alive(old), "the old runtime drains while the client holds its connection"
    return node, old, client


def test_a_draining_runtime_holds_up_no_other_deployment_nor_restart(start_node, node_env, tmp_path):
    """The drain of a replaced runtime ran in the deployer's loop: while a slow client held it
    (up to the shutdown timeout), the node deployed nothing else, restarted no crashed runtime,
    and did not even report the new version it served."""
    # Given shop v1 draining on node a, held by a slow client, and v2 serving
    node, old, client = held_drain(start_node, node_env, tmp_path)
    try:
        (shop,) = [pid for pid in runtimes_of(node.pid) if pid != old]
        # When another app is deployed
        other = write_app(tmp_path / "other", "b1")
        result = deploy(node_env, other, "--context-path", "/other")
        assert result.returncode == 0, result.stdout + result.stderr
        # Then it serves while shop v1 still drains
        rows = {row["name"]: row for row in json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)}
        other_port = rows["other"]["nodes"]["a"]["port"]
        assert wait_until(lambda: get(other_port, "/other/"), timeout=within(10))["version"] == "b1"
        assert pid_alive(old)
        # And shop v2 is reported deployed
        assert rows["shop"]["nodes"]["a"]["state"] == "deployed" and rows["shop"]["nodes"]["a"]["pid"] == shop
        # And when its runtime crashes, it is restarted and serves again while shop v1 still drains
        (crashed,) = [pid for pid in runtimes_of(node.pid) if pid not in (old, shop)]
        os.kill(crashed, signal.SIGKILL)
        node.wait_for("app runtime other v1 exited with status", timeout=within(10))
        wait_until(lambda: [pid for pid in runtimes_of(node.pid) if pid not in (old, shop, crashed)],
                   timeout=within(10), message="a new runtime of other")
        assert wait_until(lambda: get(other_port, "/other/"), timeout=within(10))["version"] == "b1"
        assert pid_alive(old)
        # And when the node gets SIGTERM, it stops the serving runtimes and waits for the draining one
        serving = [pid for pid in runtimes_of(node.pid) if pid != old]
        node.signal(signal.SIGTERM)
        wait_until(lambda: not any(pid_alive(pid) for pid in serving), timeout=within(10))
        assert pid_alive(old) and node.proc.poll() is None
    finally:
        client.close()  # the slow client hangs up: the drain ends
    # Then the old runtime exits by itself, and the node after it
    assert node.wait(timeout=within(15)) == 0
    assert not pid_alive(old)
    assert "did not stop in time; killing it" not in node.output


def test_sigkill_of_a_node_takes_its_draining_runtime_along(start_node, node_env, tmp_path):
    # Given shop v1 draining on node a, held by a slow client
    node, old, client = held_drain(start_node, node_env, tmp_path)
    try:
        new = [pid for pid in runtimes_of(node.pid) if pid != old]
        # When the node is SIGKILLed, then the draining runtime dies with it, as the serving one does
        node.signal(signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(pid) for pid in [old, *new]), timeout=within(5))
    finally:
        client.close()


def test_undeploy_waits_for_every_undeployed_runtime_of_its_name(start_node, node_env, tmp_path):
    """Regression: shop v1 undeployed and draining, v2 deployed and undeployed too: v1's drain
    ending cleared the name's node state, and the second undeploy said done while v2 drained."""
    node, folder, port, v1 = shop_node(start_node, node_env, tmp_path, **HELD)
    first = held_connection(port)
    run_flask(["immutant", "undeploy", "shop", "--wait", "1"], node_env)
    write_app(folder, "2")
    assert deploy(node_env, folder).returncode == 0
    wait_until(lambda: (get(port) or {}).get("version") == "2", timeout=within(10))
    second = held_connection(port)
    (v2,) = [pid for pid in runtimes_of(node.pid) if pid != v1]
    # When v2 is undeployed too, and v1's drain ends while the undeploy waits for v2's
    results: list[Any] = []
    undeploy = threading.Thread(target=lambda: results.append(
        run_flask(["immutant", "undeploy", "shop", "--wait", "6"], node_env)))
    undeploy.start()
    node.wait_for("undeploying shop v2")
    first.close()
    wait_until(lambda: not pid_alive(v1), timeout=within(10))
    undeploy.join(timeout=30)
    # Then the undeploy says v2 is still stopping (it is), not that shop is undeployed
    assert pid_alive(v2)
    assert "still stopping" in results[0].stdout, results[0].stdout + results[0].stderr
    second.close()
    wait_until(lambda: not pid_alive(v2), timeout=within(10))
