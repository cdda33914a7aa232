"""Session replication between two real nodes serving the same app, and the near cache's coherence."""

from __future__ import annotations

from pathlib import Path

import requests

from support import wait_until

APP = '''
from flask import Flask, current_app, session
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

@app.get("/near-hits")
def near_hits():
    return str(current_app.session_interface.near.hits)
'''


def serving(url: str) -> bool:
    try:
        return requests.get(url + "/whoami", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def two_nodes(start_node, node_env, tmp_path: Path) -> tuple[str, str]:
    app = tmp_path / "replicated_app.py"
    app.write_text(APP)
    first = start_node("--clustered", app=str(app))
    second = start_node("--clustered", "--port-offset", "100", app=str(app))
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    a, b = f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 100}"
    first.wait_for("joined cluster")
    second.wait_for("joined cluster")
    wait_until(lambda: serving(a) and serving(b), timeout=20, message="both nodes to serve the app")
    return a, b


def test_a_session_written_through_one_node_is_read_through_the_other(start_node, node_env, tmp_path: Path) -> None:
    # Given two clustered nodes serving the same app
    a, b = two_nodes(start_node, node_env, tmp_path)
    browser = requests.Session()  # one cookie jar, as a browser behind a balancer
    # When the user logs in through node A
    assert browser.post(a + "/login/alice", timeout=5).text == "ok"
    # Then node B knows them, and changes alternate between the nodes without loss
    assert browser.get(b + "/whoami", timeout=5).text == "alice 0"
    assert browser.post(b + "/visit", timeout=5).text == "1"
    assert browser.post(a + "/visit", timeout=5).text == "2"
    assert browser.get(b + "/whoami", timeout=5).text == "alice 2"
    assert browser.get(a + "/whoami", timeout=5).text == "alice 2"


def near_hits(url: str) -> int:
    return int(requests.get(url + "/near-hits", timeout=5).text)


def test_a_write_through_one_node_is_never_read_stale_from_the_others_near_cache(start_node, node_env,
                                                                                 tmp_path: Path) -> None:
    # Given two nodes, and a session that node A serves from its near cache (no store round trip)
    a, b = two_nodes(start_node, node_env, tmp_path)
    browser = requests.Session()
    assert browser.post(a + "/login/alice", timeout=5).text == "ok"
    hits = near_hits(a)
    wait_until(lambda: browser.get(a + "/whoami", timeout=5).text == "alice 0" and near_hits(a) > hits, timeout=10,
               message="a read of the session served by A's near cache (its tracking subscription is up)")
    for visit in range(1, 151):
        hits = near_hits(a)
        assert browser.get(a + "/whoami", timeout=5).text == f"alice {visit - 1}"
        # When node B changes the session and its response has returned
        assert browser.post(b + "/visit", timeout=5).text == str(visit)
        # Then A's very next read has the change: never its near copy from before the write
        assert browser.get(a + "/whoami", timeout=5).text == f"alice {visit}"
    # And A did serve reads from its near cache in between (the loop tested the near path)
    assert near_hits(a) > hits
