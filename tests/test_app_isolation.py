"""Two deployments whose Flask apps share a name (`app = Flask(__name__)` in `app.py`) share no
jobs, scheduler lease or sessions: on a real node and the real store (issue 10, point 14)."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from flask_immutant.keys import Keys

from support import run_flask, wait_until

APP = '''
from flask import Flask, session
from flask_immutant import ImmutantExtension, get_state, jobs

app = Flask(__name__)
app.secret_key = "not-a-secret"
app.config["IMMUTANT_CLUSTERED"] = True
app.config["IMMUTANT_SESSIONS"] = True
ImmutantExtension(app)
LABEL = {label!r}


def tick():
    state = get_state(app)
    state.store.incr(state.keys.prefix + "test:ticks:" + LABEL)


jobs.schedule("tick", tick, every="200ms", app=app)


@app.get("/set")
def set_label():
    session["who"] = LABEL
    return "ok"


@app.get("/get")
def get_label():
    return {{"who": session.get("who")}}
'''


def test_two_apps_with_one_flask_name_keep_their_own_jobs_and_sessions(start_node, node_env, tmp_path: Path,
                                                                       store_client, cluster_name):
    keys = Keys(cluster_name)
    node = start_node("--clustered", "--node-name", "a")
    node.wait_for("joined cluster")
    # Given two deployments of apps both named "app" by Flask
    for label in ("alpha", "beta"):
        folder = tmp_path / label
        folder.mkdir()
        (folder / "app.py").write_text(APP.format(label=label))
        result = run_flask(["immutant", "deploy", "--context-path", f"/{label}"], node_env, cwd=folder)
        assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)}
    url = {label: f"http://127.0.0.1:{rows[label]['nodes']['a']['port']}/{label}" for label in ("alpha", "beta")}
    # Then both apps' jobs fire
    for label in ("alpha", "beta"):
        wait_until(lambda label=label: int(store_client.get(keys.prefix + f"test:ticks:{label}") or 0) >= 3,
                   timeout=20, message=f"{label}'s job firing")
    # And a session of one app is not a session of the other, even with the same cookie
    alpha = requests.Session()
    assert alpha.get(url["alpha"] + "/set", timeout=5).text == "ok"
    assert alpha.get(url["alpha"] + "/get", timeout=5).json() == {"who": "alpha"}
    cookies = {cookie.name: cookie.value for cookie in alpha.cookies}
    assert requests.get(url["beta"] + "/get", cookies=cookies, timeout=5).json() == {"who": None}
    # And each app's keys are named after its deployment
    assert store_client.exists(keys.jobs_schedule("alpha")) and store_client.exists(keys.jobs_schedule("beta"))
