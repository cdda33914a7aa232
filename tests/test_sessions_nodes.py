"""Session replication between two real nodes serving the same app."""

from __future__ import annotations

from pathlib import Path

import requests

from support import wait_until

APP = '''
from flask import Flask, session
from flask_immutant import ImmutantExtension
from flask_immutant.web import regenerate

app = Flask("replicated")
app.config["IMMUTANT_SESSIONS"] = True
ImmutantExtension(app)

@app.post("/login/<user>")
def login(user):
    regenerate()
    session["user"] = user
    return "ok"

@app.post("/visit")
def visit():
    session["visits"] = session.get("visits", 0) + 1
    return str(session["visits"])

@app.get("/whoami")
def whoami():
    return f"{session.get('user', 'nobody')} {session.get('visits', 0)}"
'''


def serving(url: str) -> bool:
    try:
        return requests.get(url + "/whoami", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def test_a_session_written_through_one_node_is_read_through_the_other(start_node, node_env, tmp_path: Path) -> None:
    # Given two clustered nodes serving the same app
    app = tmp_path / "replicated_app.py"
    app.write_text(APP)
    first = start_node("--clustered", app=str(app))
    second = start_node("--clustered", "--port-offset", "100", app=str(app))
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    a, b = f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 100}"
    first.wait_for("joined cluster")
    second.wait_for("joined cluster")
    wait_until(lambda: serving(a) and serving(b), timeout=20, message="both nodes to serve the app")
    browser = requests.Session()  # one cookie jar, as a browser behind a balancer
    # When the user logs in through node A
    assert browser.post(a + "/login/alice", timeout=5).text == "ok"
    # Then node B knows them, and changes alternate between the nodes without loss
    assert browser.get(b + "/whoami", timeout=5).text == "alice 0"
    assert browser.post(b + "/visit", timeout=5).text == "1"
    assert browser.post(a + "/visit", timeout=5).text == "2"
    assert browser.get(b + "/whoami", timeout=5).text == "alice 2"
    assert browser.get(a + "/whoami", timeout=5).text == "alice 2"
