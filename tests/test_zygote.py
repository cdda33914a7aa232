"""The runtime template (server/zygote.py): runtimes fork from a process that has the libraries
imported, never the app; a killed node takes template and runtimes along; portable mode starts
fresh interpreters. Real nodes, real deploys, SIGKILL for crashes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_immutant.server import zygote

from support import children_of, pid_alive, process_name, run_flask, runtimes_of, template_of, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the template is Linux-only")

APP = '''
import os
print("app imported in process", os.getpid(), flush=True)
from flask import Flask
from flask_immutant import ImmutantExtension
from helper import GREETING

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)

@app.get("/")
def index():
    import os
    return {{"version": {version!r}, "greeting": GREETING, "pid": os.getpid(), "ppid": os.getppid()}}
'''


def write_app(folder: Path, version: str) -> Path:
    """An app whose view and whose helper module both change with the version."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(APP.format(version=version))
    (folder / "helper.py").write_text(f"GREETING = 'hello from v{version}'\n")
    return folder


def get(port: int) -> dict[str, Any] | None:
    try:
        response = requests.get(f"http://127.0.0.1:{port}/", timeout=3)
    except requests.RequestException:  # refused, or queued in the backlog of a runtime still starting
        return None
    return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]


def test_every_preloaded_module_imports():
    # Given the template's preload list, when it is imported, then nothing on it fails
    # (a renamed module would otherwise be paid for again by every runtime, silently)
    assert zygote.preload() == []


def test_a_node_forks_its_runtime_from_the_template_which_never_imports_the_app(start_node, node_env, tmp_path):
    # Given a node started with an app
    folder = write_app(tmp_path / "shop", "1")
    node = start_node("--clustered", app="app", cwd=folder)
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    served = wait_until(lambda: get(port), timeout=20)
    # Then the app runs in a child of the node's template, not in a fresh interpreter
    (template,) = template_of(node.pid)
    assert served["ppid"] == template
    assert process_name(served["pid"]) == "immutant-app"
    assert runtimes_of(node.pid) == [served["pid"]]
    assert served["greeting"] == "hello from v1"
    # And the app was imported in the runtime only, never in the template
    node.wait_for(f"app imported in process {served['pid']}", timeout=5)
    assert f"app imported in process {template}" not in node.output


def test_sigkill_of_a_node_takes_its_template_and_runtimes_along(start_node, node_env, tmp_path):
    folder = write_app(tmp_path / "shop", "1")
    node = start_node("--clustered", app="app", cwd=folder)
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    wait_until(lambda: get(port), timeout=20)
    # (under a full suite's load CI once listed a third, short-lived descendant, gone before it
    # could be named: the count is taken once it settles)
    def template_and_runtime() -> list[int] | None:
        found = [*template_of(node.pid), *runtimes_of(node.pid)]
        return found if len(found) == 2 else None

    processes = wait_until(template_and_runtime, timeout=5, message="the template and one runtime")
    assert [process_name(pid) for pid in processes] == ["immutant-tmpl", "immutant-app"]
    # When the node is SIGKILLed (none of its code runs)
    node.signal(signal.SIGKILL)
    # Then the template and the runtime die with it, and nothing serves the port
    wait_until(lambda: not any(pid_alive(pid) for pid in processes), timeout=3,
               message="the template and runtime to die with the node")
    assert get(port) is None


def test_a_redeployed_runtime_from_the_template_runs_the_new_code(start_node, node_env, tmp_path):
    # Given a node with no app and a deployed app whose view and helper module say v1
    node = start_node("--clustered", "--node-name", "a")
    node.wait_for("joined cluster")
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    folder = write_app(tmp_path / "shop", "1")
    assert run_flask(["immutant", "deploy"], node_env, cwd=folder).returncode == 0
    first = wait_until(lambda: get(port), timeout=20)
    assert (first["version"], first["greeting"]) == ("1", "hello from v1")
    # When both files change and the app is deployed again
    write_app(folder, "2")
    result = run_flask(["immutant", "deploy"], node_env, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    # Then the new runtime, forked from the same template, serves the new code of both modules
    second = wait_until(lambda: (r := get(port)) and r["version"] == "2" and r, timeout=20)
    assert second["greeting"] == "hello from v2"
    assert second["ppid"] == first["ppid"] == template_of(node.pid)[0]
    assert second["pid"] != first["pid"]


def test_a_killed_template_is_replaced_and_the_app_served_again(start_node, node_env, tmp_path):
    folder = write_app(tmp_path / "shop", "1")
    node = start_node("--clustered", app="app", cwd=folder)
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    first = wait_until(lambda: get(port), timeout=20)
    (template,) = template_of(node.pid)
    # When the template is SIGKILLed, its runtime dies with it
    os.kill(template, signal.SIGKILL)
    wait_until(lambda: not pid_alive(first["pid"]), timeout=3)
    # Then the node restarts the runtime from a new template
    node.wait_for("restarting in", timeout=5)
    again = wait_until(lambda: (r := get(port)) and r["pid"] != first["pid"] and r, timeout=20)
    assert again["ppid"] != template and again["ppid"] in template_of(node.pid)


def test_portable_mode_starts_runtimes_as_fresh_interpreters(start_node, node_env, tmp_path):
    # Given a node in portable mode (the macOS path: no parent-death signal, so no template)
    folder = write_app(tmp_path / "shop", "1")
    node = start_node("--clustered", app="app", cwd=folder, env={"IMMUTANT_PORTABLE": "1"})
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    served = wait_until(lambda: get(port), timeout=20)
    # Then its runtime is its own child, started by a fresh interpreter
    assert template_of(node.pid) == []
    assert children_of(node.pid) == [served["pid"]]
    assert served["ppid"] == node.pid
