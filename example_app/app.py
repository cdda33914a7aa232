"""The example app: Immutant's ``immutant.clj`` demo, in Flask.

- ``/queue/msg``, with a listener that prints ``received: N`` (load-balanced across nodes);
- a singleton daemon ``counter`` that publishes N every second, on exactly one node, and its
  stop function; kill -9 that node and the daemon starts on another within seconds;
- a small page with sessions and the cluster cache on, to try through the balancer.

Deploy it with ``cd example_app && flask immutant deploy`` (see README.md in this folder). For
the same app built by an app factory, see ``example_factory/``.
"""

from __future__ import annotations

import os

from flask import Flask, Response, jsonify, session

from flask_immutant import ImmutantExtension
from flask_immutant.daemons import DaemonContext

immutant = ImmutantExtension()

QUEUE = "/queue/msg"


@immutant.listen(QUEUE)
def received(n: int) -> None:
    print(f"received: {n}", flush=True)


def stop_counter() -> None:
    print("counter stopped", flush=True)


@immutant.daemon("counter", stop=stop_counter)
def counter(ctx: DaemonContext) -> None:
    """Publish the next number every second. The count lives in the cluster cache, so after a
    failover the daemon on the other node carries on from where the dead one stopped."""
    numbers = immutant.cache("example")
    while not ctx.wait(1.0):
        n = numbers.swap("counter", lambda current: (current or 0) + 1)
        immutant.publish(QUEUE, n)


app = Flask(__name__)
app.config.update(
    IMMUTANT_CLUSTERED=True,
    IMMUTANT_SESSIONS=True,
    IMMUTANT_CACHE=True,
    SECRET_KEY=os.environ.get("EXAMPLE_SECRET_KEY", "example-app-not-secret"),
)
immutant.init_app(app)


@app.get("/")
def index() -> dict[str, object]:
    """Which node served this request, and what this browser session has seen."""
    session["visits"] = session.get("visits", 0) + 1
    return {
        "app": "example_app",
        "node": immutant.state().node_name,
        "visits": session["visits"],
        "counter": immutant.cache("example").get("counter"),
    }


@app.get("/members")
def members() -> Response:
    """The cluster's live members, read from the cluster store."""
    return jsonify([member.status() for member in immutant.state().members()])
