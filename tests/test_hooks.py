"""Every lifecycle hook fires in real node and app runtime processes.

Nodes run with the recorder plugin (``tests/plugins/recorder.py``) loaded through
``IMMUTANT_PLUGINS``; it appends each hook call to one JSON-lines file that the test reads.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support import NodeProcess, run_flask, wait_until

PLUGINS_DIR = Path(__file__).parent / "plugins"

StartNode = Callable[..., NodeProcess]


class Recording:
    """The hook calls the recorder plugin appended to ``path``, from every process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        return [json.loads(line) for line in lines if line.endswith("\n")]

    def calls(self, hook: str, **match: Any) -> list[dict[str, Any]]:
        return [c for c in self.all() if c["hook"] == hook and all(c.get(k) == v for k, v in match.items())]

    def hooks(self, **match: Any) -> list[str]:
        """Hook names in call order, of the calls whose fields match."""
        return [c["hook"] for c in self.all() if all(c.get(k) == v for k, v in match.items())]

    def wait_for(self, hook: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        found = wait_until(lambda: self.calls(hook, **match), timeout, message=f"{hook} {match} in {self.path}")
        return found[0]


@pytest.fixture
def recording(tmp_path: Path) -> Recording:
    return Recording(tmp_path / "hooks.jsonl")


@pytest.fixture
def recorder_env(recording: Recording) -> dict[str, str]:
    """Extra environment for node processes: load the recorder, and a short failure timeout."""
    pythonpath = [str(PLUGINS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        "IMMUTANT_PLUGINS": "recorder",
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "RECORDER_FILE": str(recording.path),
        "IMMUTANT_FAILURE_TIMEOUT": "1.0",
    }


def start(start_node: StartNode, env: dict[str, str], name: str, *args: str, app: str | None = None) -> NodeProcess:
    """Start a clustered node called ``name`` and wait until it has joined."""
    node = start_node("--clustered", "--node-name", name, *args, app=app, env=env)
    node.wait_for(rf"node {name} joined cluster")
    return node


def test_node_lifecycle_and_graceful_leave(
    start_node: StartNode, recorder_env: dict[str, str], recording: Recording, cluster_name: str,
    node_env: dict[str, str], tmp_path: Path,
) -> None:
    a, b = f"{cluster_name}-a", f"{cluster_name}-b"
    # Given node A, then node B joining the same cluster
    start(start_node, recorder_env, a)
    node_b = start(start_node, recorder_env, b, "--port-offset", "100")
    # Then A sees B join, and B sees both members already present (itself included) join
    recording.wait_for("immutant_member_joined", node=a, member=b)
    recording.wait_for("immutant_member_joined", node=b, member=a)
    recording.wait_for("immutant_member_joined", node=b, member=b)
    assert recording.calls("immutant_member_joined", node=a, member=a)
    # And `flask immutant status` asks the plugins for their sections
    status = run_flask(["immutant", "status", "--json"], {**node_env, **recorder_env}, cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert [m["name"] for m in json.loads(status.stdout)["members"]] == sorted([a, b])
    assert recording.calls("immutant_status", cluster=cluster_name)
    assert recording.calls("immutant_register_commands", group="immutant")
    # When B stops gracefully
    node_b.signal(signal.SIGTERM)
    assert node_b.wait() == 0, node_b.output
    # Then A sees B leave, for reason "left", and B ran its node hooks in order
    left = recording.wait_for("immutant_member_left", node=a, member=b)
    assert left["reason"] == "left"
    assert [h for h in recording.hooks(node=b) if h.startswith("immutant_node_")] == [
        "immutant_node_starting", "immutant_node_started", "immutant_node_stopping",
    ]
    assert not recording.calls("immutant_node_stopping", node=a)


def test_crashed_member_leaves_by_timeout(
    start_node: StartNode, recorder_env: dict[str, str], recording: Recording, cluster_name: str
) -> None:
    a, c = f"{cluster_name}-a", f"{cluster_name}-c"
    # Given two nodes that see each other
    start(start_node, recorder_env, a)
    node_c = start(start_node, recorder_env, c, "--port-offset", "100")
    recording.wait_for("immutant_member_joined", node=a, member=c)
    # When C is killed with SIGKILL (no chance to leave)
    node_c.signal(signal.SIGKILL)
    node_c.wait()
    # Then, after IMMUTANT_FAILURE_TIMEOUT (1 s here), A sees C leave for reason "timeout"
    left = recording.wait_for("immutant_member_left", timeout=10.0, node=a, member=c)
    assert left["reason"] == "timeout"
    assert not recording.calls("immutant_node_stopping", node=c)


APP = '''\
from flask import Flask

from flask_immutant import ImmutantExtension

app = Flask("hooked_app")
ImmutantExtension(app)


@app.get("/")
def index() -> str:
    return "hooked"
'''


def test_app_runtime_hooks(
    start_node: StartNode, recorder_env: dict[str, str], recording: Recording, cluster_name: str, tmp_path: Path
) -> None:
    # Given a tiny app with ImmutantExtension, and a node started with it
    app_file = tmp_path / "hooked.py"
    app_file.write_text(APP)
    name = f"{cluster_name}-app"
    node = start(start_node, recorder_env, name, app=str(app_file))
    # Then the app runtime (a child process of the node) reports it serves
    started = recording.wait_for("immutant_runtime_started", app="hooked_app")
    runtime_pid = started["pid"]
    assert runtime_pid != node.pid
    assert started["node"] == name
    # And init_app ran once in the node process and once in the runtime process
    assert sorted(c["pid"] for c in recording.calls("immutant_init_app", app="hooked_app")) == sorted(
        [node.pid, runtime_pid]
    )
    assert all(c["cluster"] == cluster_name for c in recording.calls("immutant_init_app"))
    # And every process built its settings table with the plugins' rows
    assert {c["pid"] for c in recording.calls("immutant_settings")} >= {node.pid, runtime_pid}
    # When the node stops gracefully
    node.signal(signal.SIGTERM)
    assert node.wait() == 0, node.output
    # Then the runtime stopped its background work before the node left
    stopping = recording.calls("immutant_runtime_stopping", app="hooked_app")
    assert [c["pid"] for c in stopping] == [runtime_pid]
    order = recording.hooks()
    assert order.index("immutant_node_stopping") < order.index("immutant_runtime_stopping")
