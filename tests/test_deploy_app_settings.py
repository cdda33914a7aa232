"""A deployed app's own settings reach its runtime: a deployed runtime resolves ``IMMUTANT_*``
like an app started with ``--app`` (its config, then the node's environment, then ``--set``),
on real nodes with a real ``flask immutant deploy``."""

from __future__ import annotations

from pathlib import Path

import redis

from flask_immutant import ImmutantState, events
from flask_immutant.keys import Keys
from flask_immutant.messaging.plugin import messaging_of

from support import run_flask, wait_until

FAILING_APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension, messaging

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
app.config["IMMUTANT_MESSAGING_MAX_RETRIES"] = 0
app.config["IMMUTANT_MESSAGING_MIN_BACKOFF"] = 0.05
ImmutantExtension(app)

def work(body):
    raise RuntimeError("cannot handle " + str(body))

messaging.listen("/queue/orders", work, app=app)
'''


def dead_letters(store: redis.Redis, keys: Keys) -> list[events.Event]:
    return [e for e in events.read(store, keys) if e.kind == "message.dead"]


def publish(node_env: dict[str, str], body: object) -> None:
    state = ImmutantState.build({}, environ=node_env)
    messaging = messaging_of(state)
    try:
        messaging.publish("/queue/orders", body)
    finally:
        messaging.publisher.close()
        state.store.close()


def test_a_deployed_app_keeps_the_retry_settings_of_its_config(start_node, node_env, tmp_path: Path,
                                                               store_client, cluster_name):
    # Given two nodes started without an app, and an app whose config says: no retries
    keys = Keys(cluster_name)
    a = start_node("--clustered", "--node-name", "a")
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100")
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "app.py").write_text(FAILING_APP)
    # When it is deployed and a message to its failing handler is published
    result = run_flask(["immutant", "deploy"], node_env, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    a.wait_for("consuming /queue/orders", timeout=30)
    b.wait_for("consuming /queue/orders", timeout=30)
    publish(node_env, {"n": 1})
    # Then it is dead-lettered after its one attempt (the node's defaults, 5 retries, do not win)
    (dead,) = wait_until(lambda: dead_letters(store_client, keys), timeout=90, message=a.output + b.output)
    assert dead.fields["attempts"] == 1, dead.fields


def test_a_deployed_app_takes_the_retry_settings_of_the_node_environment(start_node, node_env, tmp_path: Path,
                                                                         store_client, cluster_name):
    # Given two nodes whose environment says one retry, quickly, and an app that says nothing about it
    keys = Keys(cluster_name)
    env = {"IMMUTANT_MESSAGING_MAX_RETRIES": "1", "IMMUTANT_MESSAGING_MIN_BACKOFF": "0.05"}
    a = start_node("--clustered", "--node-name", "a", env=env)
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", env=env)
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "app.py").write_text(FAILING_APP.replace('app.config["IMMUTANT_MESSAGING_MAX_RETRIES"] = 0\n', "")
                                   .replace('app.config["IMMUTANT_MESSAGING_MIN_BACKOFF"] = 0.05\n', ""))
    # When it is deployed and a message to its failing handler is published
    result = run_flask(["immutant", "deploy"], node_env, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    a.wait_for("consuming /queue/orders", timeout=30)
    b.wait_for("consuming /queue/orders", timeout=30)
    publish(node_env, {"n": 2})
    # Then it is dead-lettered after two attempts
    (dead,) = wait_until(lambda: dead_letters(store_client, keys), timeout=90, message=a.output + b.output)
    assert dead.fields["attempts"] == 2, dead.fields
