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
    folder = write_app(tmp_path / "listed", "x")
    _deployments(store_client, cluster, home).put(
        Deployment(name="listed", import_path=["app", "other"], root=str(folder)))  # type: ignore[arg-type]
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
        assert state["state"] == "failed" and state["error"], state
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
