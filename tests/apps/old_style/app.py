"""Old-style code, kept as it was written before the extension became the handle (this is
example_app/app.py as of that change): ``ImmutantExtension(app)`` and module functions with
``app=``. tests/test_api.py runs it unchanged; only the block at the end is new, and it uses the
old names too (``jobs.schedule``, ``messaging.current_message``, ``daemons.current``,
``jobs.current``), each checked against the one ``flask_immutant.current()``.

The original docstring:

- ``/queue/msg``, with a listener that prints ``received: N`` (load-balanced across nodes);
- a singleton daemon ``counter`` that publishes N every second, on exactly one node, and its
  stop function; kill -9 that node and the daemon starts on another within seconds;
- a small page with sessions and the cluster cache on, to try through the balancer.

Deploy it with ``cd example_app && flask immutant deploy`` (see README.md in this folder).
"""

from __future__ import annotations

import os
import threading

from flask import Flask, jsonify, session

from flask_immutant import ImmutantExtension, caching, daemons, get_state, messaging

app = Flask(__name__)
app.config.update(
    IMMUTANT_CLUSTERED=True,
    IMMUTANT_SESSIONS=True,
    IMMUTANT_CACHE=True,
    SECRET_KEY=os.environ.get("EXAMPLE_SECRET_KEY", "example-app-not-secret"),
)
ImmutantExtension(app)

QUEUE = "/queue/msg"
messaging.start(QUEUE, app=app)


@messaging.listen(QUEUE, app=app)
def received(n: int) -> None:
    print(f"received: {n}", flush=True)


_stopped = threading.Event()


def counter() -> None:
    """Publish the next number every second. The count lives in the cluster cache, so after a
    failover the daemon on the other node carries on from where the dead one stopped."""
    _stopped.clear()
    context = daemons.current()
    numbers = caching.cache("example")
    while not (_stopped.is_set() or (context is not None and context.wait(1.0))):
        n = numbers.swap("counter", lambda current: (current or 0) + 1)
        messaging.publish(QUEUE, n)


def stop_counter() -> None:
    print("counter stopped", flush=True)
    _stopped.set()


daemons.start("counter", counter, stop_counter, app=app)


@app.get("/")
def index() -> dict[str, object]:
    """Which node served this request, and what this browser session has seen."""
    session["visits"] = session.get("visits", 0) + 1
    return {
        "app": "example_app",
        "node": get_state().node_name,
        "visits": session["visits"],
        "counter": caching.cache("example").get("counter"),
    }


@app.get("/members")
def members() -> object:
    """The cluster's live members, read from the cluster store."""
    return jsonify([member.status() for member in get_state().members()])


# --- added for the test: a job, and every "what am I running for" spelling --------------------

import flask_immutant  # noqa: E402
from flask_immutant import jobs  # noqa: E402


@messaging.listen("/queue/contexts", app=app)
def seen_by_listener(body: str) -> None:
    message = messaging.current_message()
    same = message is not None and flask_immutant.current() is message and message.body == body
    print(f"context listener {type(message).__name__} same={same}", flush=True)


def tick() -> None:
    fire = jobs.current()
    print(f"context job {type(fire).__name__} same={flask_immutant.current() is fire}", flush=True)
    messaging.publish("/queue/contexts", "from the job")


jobs.schedule("tick", tick, every="1s", app=app)


def watcher() -> None:
    context = daemons.current()
    print(f"context daemon {type(context).__name__} same={flask_immutant.current() is context}", flush=True)
    while context is not None and not context.wait(0.5):
        pass


daemons.start("watcher", watcher, singleton=False, app=app)
