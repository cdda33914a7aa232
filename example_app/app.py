"""The example app: a plain Flask app with ImmutantExtension.

Later features (messaging, the `counter` singleton daemon, sessions and cache) are added here as
they land; see README.md in this folder for the walkthrough.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify

from flask_immutant import ImmutantExtension, get_state

app = Flask(__name__)
app.config.update(IMMUTANT_CLUSTERED=True)
ImmutantExtension(app)


@app.get("/")
def index() -> dict[str, object]:
    """Which node and process served this request: try it through two nodes."""
    settings = get_state().settings
    return {
        "app": "example_app",
        "node": os.environ.get("IMMUTANT_NODE_NAME"),
        "cluster": settings["IMMUTANT_CLUSTER"],
        "pid": os.getpid(),
    }


@app.get("/members")
def members() -> object:
    """The cluster's live members, read from the cluster store."""
    return jsonify([member.status() for member in get_state().members()])
