"""The CLI tells the truth: ``deploy --wait`` fails when a node does not answer, and ``ctl``
refuses a node or context nobody runs unless ``--future`` says it is meant for a later one."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flask_immutant.keys import Keys

from support import run_flask

APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)

@app.get("/")
def index():
    return "ok"
'''


def _app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(APP)
    return folder


def _ghost_member(store_client, cluster: str, name: str, ttl_ms: int = 60_000) -> None:
    """A member whose heartbeat claim is live but whose node never answers (hung, partitioned)."""
    keys = Keys(cluster)
    record = {"name": name, "address": "127.0.0.1", "host": "127.0.0.1", "ports": {"http": 1}, "port_offset": 0,
              "data_dir": "/nonexistent", "pid": 1, "hostname": "elsewhere", "clustered": True,
              "started_at": time.time()}
    store_client.hset(keys.members, name, json.dumps(record))
    store_client.set(keys.member_claim(name), "elsewhere|1|x", px=ttl_ms)


def test_deploy_exits_non_zero_naming_the_nodes_that_did_not_answer(start_node, node_env, tmp_path, store_client,
                                                                     cluster_name):
    # Given a running node, and a member that holds its claim but never answers
    node = start_node("--clustered", "--node-name", "a")
    node.wait_for("joined cluster")
    _ghost_member(store_client, cluster_name, "ghost")
    # When an app is deployed with a short wait
    result = run_flask(["immutant", "deploy", "--wait", "3"], node_env, cwd=_app(tmp_path / "shop"))
    # Then node a deploys it, but the command fails and names the silent node in one error line
    assert "a: deployed" in result.stdout, result.stdout + result.stderr
    assert "ghost: no answer within 3s" in result.stdout
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: shop v1 is not deployed on ghost (failed or no answer; see above)"]


def test_ctl_refuses_an_unknown_node_or_context_unless_future(start_node, node_env, tmp_path, store_client,
                                                              cluster_name):
    node = start_node("--clustered", "--node-name", "a")
    node.wait_for("joined cluster")
    assert run_flask(["immutant", "deploy", "--context-path", "/shop"], node_env,
                     cwd=_app(tmp_path / "shop")).returncode == 0
    # A known node and a deployed context are accepted
    for args in (["disable", "--node", "a"], ["enable", "--context", "/shop"], ["weight", "50", "--node", "a"]):
        result = run_flask(["immutant", "ctl", *args], node_env)
        assert result.returncode == 0, result.stdout + result.stderr
    # A typo is one error line, naming what runs, and stores nothing
    for args, message in ((["enable", "--node", "b"], "no node named 'b' is running (running: a)"),
                          (["disable", "--context", "/shp"], "no context '/shp' is served or deployed"),
                          (["weight", "10", "--node", "nobody"], "no node named 'nobody'")):
        result = run_flask(["immutant", "ctl", *args], node_env)
        assert result.returncode == 1, result.stdout
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("Error: ") and message in line and "--future" in line, line
    keys = Keys(cluster_name)
    assert set(store_client.hkeys(keys.context_control)) == {b"a|*", b"*|/shop"}
    assert set(store_client.hkeys(keys.context_weight)) == {b"a|*"}
    # With --future the intent is stored, and stdout says it is for a node that is not running
    result = run_flask(["immutant", "ctl", "disable", "--node", "b", "--future"], node_env)
    assert result.returncode == 0, result.stderr
    assert "stored for the future: no node named 'b' is running" in result.stdout
    assert "DISABLED: node b" in result.stdout
    assert store_client.hget(keys.context_control, "b|*") == b"DISABLED"
