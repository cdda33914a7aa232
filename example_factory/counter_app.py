"""The example app built by an app factory: the extension is declared at import, before any app.

    shell 1$ cd example_factory && flask --app 'counter_app:create_app()' immutant run --clustered
    shell 2$ cd example_factory && flask --app 'counter_app:create_app()' immutant run --clustered --port-offset 100

or deploy it to running nodes: ``cd example_factory && flask --app 'counter_app:create_app()' immutant deploy``.

- ``/queue/ticks`` with a listener printing ``received: N`` on whichever node gets the message;
- a singleton daemon ``ticker`` counting in the cluster cache and publishing every second;
- a singleton job ``report`` printing the count (every 5 minutes; ``EXAMPLE_REPORT_EVERY``);
- ``GET /``: which node served you and the count.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Flask

from flask_immutant import ImmutantExtension
from flask_immutant.daemons import DaemonContext
from flask_immutant.jobs import Fire

immutant = ImmutantExtension()
pages = Blueprint("pages", __name__)

QUEUE = "/queue/ticks"


@immutant.listen(QUEUE)
def received(n: int) -> None:
    print(f"received: {n}", flush=True)


@immutant.daemon("ticker")  # a singleton: one node of the cluster runs it; if it dies, another does
def ticker(ctx: DaemonContext) -> None:
    ticks = immutant.cache("ticks")
    while not ctx.wait(1.0):
        immutant.publish(QUEUE, ticks.inc("count"))


@immutant.job("report", every=os.environ.get("EXAMPLE_REPORT_EVERY", "5m"))
def report(fire: Fire) -> None:
    print(f"report: {immutant.cache('ticks').get('count')} ticks (due {fire.due:.0f}, on {fire.node})", flush=True)


@pages.get("/")
def index() -> dict[str, Any]:
    return {"node": immutant.state().node_name, "count": immutant.cache("ticks").get("count")}


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(IMMUTANT_CLUSTERED=True, IMMUTANT_CACHE=True)
    app.config.from_mapping(config or {})
    immutant.init_app(app)
    app.register_blueprint(pages)
    return app
