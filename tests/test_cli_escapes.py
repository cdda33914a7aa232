"""Stored text cannot drive the operator's terminal: control characters that reach a command's
output through the store (a dead letter's reason, a failed deployment's error) print as visible
escapes, on real node processes and a real store."""

from __future__ import annotations

import re
from pathlib import Path

from flask_immutant import events
from flask_immutant.keys import Keys

from support import invoke_flask, run_flask

#: What a terminal would act on: C0 controls (but the newline ending each line), DEL, C1 controls.
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")
HOSTILE = "bad order \x1b]0;pwned\x07\x1b[2J\x1b[31mRED\x1b[0m\n2026-11-29T06:00:00.000Z  member.left  n2  forged"


def test_events_prints_a_hostile_dead_letter_reason_as_one_inert_line(node_env, store_client, cluster_name):
    # Given a dead letter whose reason quotes an attacker-chosen message body
    pipe = store_client.pipeline()
    events.record(pipe, Keys(cluster_name), "message.dead", node="n1", queue="q", destination="/queue/orders",
                  message_id="m1", reason=f"ValueError: {HOSTILE}", attempts=3)
    pipe.execute()
    # When the event log is listed
    result = invoke_flask(["immutant", "events"], node_env)
    # Then the reason is on the event's own line, its escapes visible and inert
    assert result.returncode == 0, result.stderr
    _header, row = result.stdout.splitlines()
    assert "message.dead" in row and "\\x1b]0;pwned\\x07\\x1b[2J" in row and "\\n2026-11-29T06" in row
    assert not CONTROL.search(result.stdout)


BROKEN_APP = '''
import os
from flask import Flask
from flask_immutant import ImmutantExtension

app = Flask(__name__)
ImmutantExtension(app)
if "IMMUTANT_NODE_NAME" in os.environ:  # loads for `flask immutant deploy`, fails in the node's runtime
    raise RuntimeError("cannot start \\x1b]0;pwned\\x07\\x1b[2J\\x9b31m")
'''


def test_deploy_and_list_print_a_hostile_start_error_inert(start_node, node_env, tmp_path: Path):
    # Given a node, and an app whose start error carries terminal escape sequences
    node = start_node("--node-name", "a")
    node.wait_for("joined cluster")
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "app.py").write_text(BROKEN_APP)
    # When it is deployed (and fails) and the deployments are listed
    deployed = run_flask(["immutant", "deploy", "--wait", "30"], node_env, cwd=folder)
    listed = invoke_flask(["immutant", "list"], node_env)
    # Then both name the error with its escapes visible, and print nothing a terminal acts on
    assert deployed.returncode == 1 and "a: failed" in deployed.stdout, deployed.stdout + deployed.stderr
    for output in (deployed.stdout, deployed.stderr, listed.stdout, listed.stderr):
        assert not CONTROL.search(output), output
    assert "cannot start \\x1b]0;pwned\\x07\\x1b[2J\\x9b31m" in deployed.stdout
    assert "cannot start \\x1b]0;pwned\\x07" in listed.stdout
