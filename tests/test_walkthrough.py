"""DESIGN.md's walkthrough, as a newcomer types it, on real processes:

    shell 1$ flask immutant run --clustered
    shell 2$ flask immutant run --clustered --port-offset 100
    shell 3$ cd example_app && flask immutant deploy
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import requests

from flask_immutant.keys import Keys

from support import received, run_flask, wait_until, within

EXAMPLE_APP = Path(__file__).resolve().parent.parent / "example_app"



def test_the_walkthrough(start_node, node_env, tmp_path, store_client, cluster_name):
    keys = Keys(cluster_name)
    (tmp_path / "shell1").mkdir()
    (tmp_path / "shell2").mkdir()
    nodes = {
        "first": start_node("--clustered", cwd=tmp_path / "shell1"),
        "second": start_node("--clustered", "--port-offset", "100", cwd=tmp_path / "shell2"),
    }
    for node in nodes.values():
        node.wait_for("joined cluster")
    names = {key: node.wait_for(r"flask-immutant node (\S+):").group(1) for key, node in nodes.items()}

    # shell 3: cd example_app && flask immutant deploy
    result = run_flask(["immutant", "deploy"], node_env, cwd=EXAMPLE_APP)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deployment example_app v1 registered" in result.stdout

    # The singleton daemon `counter` runs on exactly one node and both nodes print `received: N`
    holder = wait_until(lambda: store_client.get(keys.lease("daemon:counter")), timeout=10)
    holder_name = json.loads(holder)["node"]
    for node in nodes.values():
        wait_until(lambda node=node: received(node), timeout=15)
    daemons = json.loads(run_flask(["immutant", "daemons", "--json"], node_env).stdout)
    assert [(d["name"], d["node"]) for d in daemons] == [("counter", holder_name)]

    # Kill -9 the node running the daemon: within a few seconds it starts on the other one
    victim = next(key for key, name in names.items() if name == holder_name)
    survivor = "second" if victim == "first" else "first"
    nodes[victim].signal(signal.SIGKILL)
    nodes[victim].wait()
    wait_until(lambda: (h := store_client.get(keys.lease("daemon:counter"))) and
               json.loads(h)["node"] == names[survivor], timeout=within(10))
    count = len(received(nodes[survivor]))
    wait_until(lambda: len(received(nodes[survivor])) >= count + 2, timeout=10)
    # The count goes on where it was: the counter lives in the cluster cache
    numbers = received(nodes[survivor])
    assert numbers[-1] > numbers[0]

    # Restart the killed node: it rejoins, deploys the app and receives messages again
    offset = ["--port-offset", "100"] if victim == "second" else []
    nodes[victim] = start_node("--clustered", *offset, cwd=tmp_path / ("shell2" if victim == "second" else "shell1"))
    nodes[victim].wait_for("deployed example_app v1", timeout=20)
    wait_until(lambda: received(nodes[victim]), timeout=15)

    # The page shows the session and cache working across nodes
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    session = requests.Session()
    first = session.get(f"http://127.0.0.1:{base}/", timeout=5).json()
    second = session.get(f"http://127.0.0.1:{base + 100}/", timeout=5).json()
    assert (first["visits"], second["visits"]) == (1, 2)
    assert {first["node"], second["node"]} == set(names.values())

    # Undeploy: the daemon stops everywhere and nothing is received any more
    result = run_flask(["immutant", "undeploy", "example_app"], node_env)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: store_client.get(keys.lease("daemon:counter")) is None, timeout=5)
    assert any("counter stopped" in line for node in nodes.values() for line in node.lines)
