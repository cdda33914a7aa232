"""Garbage in the store or the deployments folder never kills the deployer, and never breaks a
listing: the bad record is skipped or refused and reported, the rest work — on a real node."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_immutant.deploy.records import Deployment, cluster_secret
from flask_immutant.deploy.store import DeploymentStore
from flask_immutant.keys import Keys

from support import run_flask, wait_until

APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)

@app.get("/")
def index():
    return {"version": VERSION}

VERSION = %r
'''


def write_app(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(APP % version)
    return folder


@pytest.fixture
def node(start_node, node_env):
    process = start_node("--clustered", "--node-name", "a")
    process.wait_for("joined cluster")
    return process


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"x = 1\n") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _folder(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def _deployments(store_client: Any, cluster: str, home: Path) -> DeploymentStore:
    return DeploymentStore(store_client, Keys(cluster), cluster_secret({"IMMUTANT_HOME": str(home)}))


def _signed_archive(data: bytes) -> Callable[..., str]:
    def put(store_client: Any, cluster: str, home: Path, tmp_path: Path) -> str:
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        _deployments(store_client, cluster, home).put(
            Deployment(name="odd", import_path="app", root="/nonexistent", archive=digest), archive=data)
        return "odd"
    return put


def _non_utf8_field(store_client: Any, cluster: str, home: Path, tmp_path: Path) -> str:
    keys = Keys(cluster)
    store_client.hset(keys.deployments, b"\xff\xfebad", b"\xff")
    store_client.publish(keys.deployments_changed, b"\xff\xfebad")
    return "\\xff\\xfebad"


def _signed_list_app(store_client: Any, cluster: str, home: Path, tmp_path: Path) -> str:
    """A record signed with the cluster secret (so it passes the signature) whose ``app`` is a
    list: signed by hand, since ``Deployment`` itself refuses to hold one."""
    from flask_immutant.deploy.records import SIGNATURE_ALGORITHM, _mac

    folder = write_app(tmp_path / "listed", "x")
    keys = Keys(cluster)
    record = Deployment(name="listed", import_path="app", root=str(folder), cluster=cluster, version=1).to_dict()
    record["import_path"] = ["app", "other"]
    secret = cluster_secret({"IMMUTANT_HOME": str(home)})
    store_client.hset(keys.deployments, "listed", json.dumps(
        {"record": record, "algorithm": SIGNATURE_ALGORITHM, "signature": _mac(secret, record)}))
    store_client.publish(keys.deployments_changed, "listed")
    return "listed"


CASES = {
    "non-utf8-hash-field": _non_utf8_field,
    "archive-member-dot": _signed_archive(_tar(_file("."), _file("app.py"))),
    "file-then-folder-of-one-name": _signed_archive(_tar(_file("pkg"), _folder("pkg"), _file("pkg/app.py"))),
    "signed-record-whose-app-is-a-list": _signed_list_app,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_garbage_in_the_deployments_leaves_the_deployer_alive_and_is_reported(
        case, node, node_env, tmp_path, store_client, cluster_name, immutant_home):
    # Given a running node, and garbage in the cluster's deployments
    name = CASES[case](store_client, cluster_name, immutant_home, tmp_path)
    # When a good app is deployed after it
    folder = write_app(tmp_path / "good", "1")
    result = run_flask(["immutant", "deploy", "--name", "good"], node_env, cwd=folder)
    # Then the deployer is alive: the good app deploys and serves
    assert result.returncode == 0 and "a: deployed" in result.stdout, result.stdout + result.stderr
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).json() == {"version": "1"}
    # And the garbage is reported: as a failed deployment on the node, or as a status warning
    status = json.loads(run_flask(["immutant", "status", "--json"], node_env).stdout)
    rows = {row["name"]: row for row in status["deployments"]}
    if name in rows:
        state = rows[name]["nodes"]["a"]
        assert state["state"] in ("failed", "refused") and state["error"], state
    else:
        assert any(name in warning for warning in status["warnings"]), status["warnings"]
    # And no loop of the node is failing
    member = next(m for m in status["members"] if m["name"] == "a")
    assert member["healthy"], member
    assert "Traceback" not in run_flask(["immutant", "list"], node_env).stderr


def test_a_descriptor_whose_app_is_a_list_is_refused_and_the_folder_goes_on(
        node, node_env, tmp_path, store_client, cluster_name, immutant_home):
    deployments = immutant_home / "deployments"
    deployments.mkdir(exist_ok=True)
    good_folder = write_app(tmp_path / "dropped", "2")
    bad = deployments / f"listed-{cluster_name}.json"
    good = deployments / f"good-{cluster_name}.json"
    try:
        # Given a descriptor whose app is a list, then a good one
        bad.write_text(json.dumps({"root": str(good_folder), "app": ["app", "other"]}))
        wait_until(lambda: Path(f"{bad}.failed").exists(), timeout=10)
        good.write_text(json.dumps({"root": str(good_folder), "app": "app"}))
        # Then the bad one is refused with the reason, and the good one deploys on the node
        assert "'app' must be a string" in Path(f"{bad}.failed").read_text()
        port = int(node_env["IMMUTANT_HTTP_PORT"])
        wait_until(lambda: _version(port) == "2", timeout=15)
        node.wait_for(f"deployed good-{cluster_name} v1")
    finally:
        for path in deployments.glob(f"*{cluster_name}*"):
            path.unlink()


def _version(port: int) -> str | None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/", timeout=3)
    except requests.ConnectionError:
        return None
    return response.json().get("version") if response.status_code == 200 else None


# --- listings skip malformed records, name them, show the rest ---------------------------------

BUSY_APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension, daemons, get_state, jobs, messaging

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)
messaging.start("/queue/work", app=app)

def tick():
    get_state().store.incr(get_state().keys.prefix + "test:ticks")

jobs.schedule("tick", tick, every=0.5, app=app)

def keeper():
    ctx = daemons.current()
    while not ctx.wait(0.2):
        pass

daemons.start("keeper", keeper, app=app)

@app.get("/")
def index():
    return "ok"
'''


def _write_garbage(store: Any, keys: Keys, job_app: str) -> list[str]:
    """One bad record of each family a listing reads; returns words each warning must name."""
    store.hset(keys.daemons, "junk-daemon", "not json")
    store.hset(keys.daemons, "wrong-daemon", json.dumps({"name": 5, "singleton": "yes"}))
    store.hset(keys.daemons, b"\xff\xfe-daemon", "{}")
    job_key = keys.rq_job_prefix + f"{job_app}-tick"
    store.restore(keys.rq_job_prefix + f"{job_app}-junkjob", 0, store.dump(job_key))
    store.hset(keys.job_state(job_app, "junkjob"), mapping={"fired": "many", "last_due": "yesterday"})
    store.zadd(keys.jobs_schedule(job_app), {b"\xff\xfe-job": 1.0, f"{job_app}-junkjob": 2e9})
    store.hset(keys.messaging_destinations, "/queue/junk", "[1, 2]")
    store.hset(keys.messaging_destinations, "/queue/nameless", json.dumps({"kind": "queue"}))
    store.hset(keys.messaging_destinations, "/topic/odd", json.dumps({"kind": "topic"}))
    store.hset(keys.messaging_subscriptions("/topic/odd"), "sub", "{broken")
    store.set(keys.context("z", "/junk"), json.dumps({"node": "z", "context_path": "/junk", "port": "eighty"}))
    store.sadd(keys.contexts, keys.context("z", "/junk"))
    store.hset(keys.context_weight, "z|*", "heavy")
    store.hset(keys.deployments, b"\xff\xfe-deployment", "x")
    store.hset(keys.deployment_nodes("ghost"), "a", "[]")
    store.hset(keys.members, "ghost", json.dumps({"name": "ghost", "ports": "none"}))
    store.set(keys.member_claim("ghost"), "elsewhere|1|x", px=60_000)
    return ["junk-daemon", "wrong-daemon", "\\xff\\xfe-daemon", "junkjob", "/queue/junk", "/queue/nameless",
            "sub", "/junk", "z|*", "\\xff\\xfe-deployment", "ghost"]


def test_malformed_records_never_break_a_listing(start_node, node_env, tmp_path, store_client, cluster_name):
    # Given a node running an app with a daemon, a job and a queue
    app_file = tmp_path / "busy.py"
    app_file.write_text(BUSY_APP)
    node = start_node("--clustered", "--node-name", "a", app=str(app_file))
    node.wait_for("joined cluster")
    keys = Keys(cluster_name)
    rows = wait_until(lambda: json.loads(run_flask(["immutant", "jobs", "--json"], node_env).stdout), timeout=15)
    job_app = rows[0]["app"]
    # When garbage is written beside the good records of every family a listing reads
    names = _write_garbage(store_client, keys, job_app)
    # Then every listing answers, shows the good records, and names each bad one on stderr
    for command, good in ((["jobs"], "tick"), (["daemons"], "keeper"), (["queues"], "/queue/work"),
                          (["status"], "a"), (["list"], "no deployments"), (["ctl", "show"], "/")):
        result = run_flask(["immutant", *command], node_env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stdout, result.stderr)
        assert good in result.stdout, (command, result.stdout)
        assert all(line.startswith("Warning: skipped") for line in result.stderr.splitlines()), result.stderr
    status = json.loads(run_flask(["immutant", "status", "--json"], node_env).stdout)
    warnings = "\n".join(status["warnings"])
    for name in names:
        assert name in warnings, (name, warnings)
    assert [d["name"] for d in status["daemons"]] == ["keeper"]
    assert [j["name"] for j in status["jobs"]] == ["tick"]
    assert [q["name"] for q in status["queues"]] == ["/queue/work", "/topic/odd"]
    assert [m["name"] for m in status["members"]] == ["a"]
    # And the console's status API answers 200 with the same warnings
    document = _console_status(node_env)
    assert [d["name"] for d in document["daemons"]] == ["keeper"] and "junk-daemon" in "".join(document["warnings"])
    # And the node's own loops read past the garbage: the job goes on ticking, no loop is failing
    ticks = int(store_client.get(keys.prefix + "test:ticks") or 0)
    wait_until(lambda: int(store_client.get(keys.prefix + "test:ticks") or 0) > ticks + 1, timeout=10)
    member = next(m for m in status["members"] if m["name"] == "a")
    assert member["healthy"], member


def _console_status(env: dict[str, str]) -> dict[str, Any]:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from flask_immutant.balancer.console import make_console_app
    from flask_immutant.extension import ImmutantState

    secret = "listing-test-secret-0123456789"
    state = ImmutantState.build(environ={"IMMUTANT_HOME": env["IMMUTANT_HOME"],
                                         "IMMUTANT_CLUSTER": env["IMMUTANT_CLUSTER"], "IMMUTANT_SECRET": secret})

    async def main() -> dict[str, Any]:
        async with TestClient(TestServer(make_console_app(state))) as client:
            origin = str(client.make_url("/")).rstrip("/")
            login = await client.post("/login", json={"token": secret}, headers={"Origin": origin})
            assert login.status == 200
            response = await client.get("/api/status")
            assert response.status == 200, await response.text()
            return (await response.json())["status"]  # type: ignore[no-any-return]

    return asyncio.run(main())
