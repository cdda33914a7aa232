"""Requests/s of a session-reading view: flask-immutant sessions vs Flask-Session as shipped.

A benchmark, not a test: it prints figures and asserts nothing. It starts a private embedded
store (a real redis-server on a unix socket under a temporary ``IMMUTANT_HOME``) and serves the
same view from two apps on it:

- ``IMMUTANT_SESSIONS = True`` (msgpack, sliding expiry, no write when unchanged, the near cache:
  a hot unchanged session is read with no round trip);
- the same with ``IMMUTANT_SESSION_NEAR_ENTRIES = 0`` (every read is one round trip), for reference;
- Flask-Session 0.8 as shipped: ``SESSION_TYPE = "redis"`` with its defaults (permanent sessions,
  Flask's ``SESSION_REFRESH_EACH_REQUEST = True``), on a client of the same store.

Each logs in once, then requests the view (which reads two session keys) over and over through
Flask's test client (in-process WSGI, so the figures are the session layer plus Flask, not an HTTP
server's). It also counts, from the server's command statistics, the store commands and the
writes each request costs. The ratio compares two figures of the same run.

    python bench/sessions.py [--requests 5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WRITES = ("set", "setex", "hset", "del", "pexpire", "expire", "evalsha", "eval", "hdel")


def build(name: str, configure: Any) -> Any:
    from flask import Flask, session

    app = Flask(name)
    configure(app)

    @app.post("/login")
    def login() -> str:
        session["user"] = "ada"
        session["cart"] = ["book", "pen"]
        return "ok"

    @app.get("/me")
    def me() -> str:
        return f"{session.get('user')} has {len(session.get('cart', []))} items"

    return app


def commandstats(client: Any) -> dict[str, int]:
    return {key.removeprefix("cmdstat_"): value["calls"] for key, value in client.info("commandstats").items()}


def measure(apps: list[Any], requests: int, repeat: int, client: Any) -> list[tuple[float, float, float]]:
    """Per app: (requests/s, store commands per request, store writes per request). The apps' rounds
    are interleaved, so that a burst of other work on the machine falls on all of them."""
    browsers = []
    for app in apps:
        browser = app.test_client()
        assert browser.post("/login").status_code == 200
        assert browser.get("/me").text == "ada has 2 items"
        browsers.append(browser)
    best = [0.0] * len(apps)
    commands = [0] * len(apps)
    writes = [0] * len(apps)
    for _ in range(repeat):
        for which, browser in enumerate(browsers):
            before = commandstats(client)
            start = time.perf_counter()
            for _ in range(requests):
                browser.get("/me")
            best[which] = max(best[which], requests / (time.perf_counter() - start))
            after = commandstats(client)
            commands[which] += sum(after.get(k, 0) - before.get(k, 0) for k in after if k != "info")
            writes[which] += sum(after.get(k, 0) - before.get(k, 0) for k in WRITES)
    total = requests * repeat
    return [(best[i], commands[i] / total, writes[i] / total) for i in range(len(apps))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import redis
    from flask_session import Session

    from flask_immutant import ImmutantExtension
    from flask_immutant.store import EmbeddedStore

    home = Path(tempfile.mkdtemp(prefix="imb-"))
    store = EmbeddedStore(home)
    try:
        store.ensure_running()
        for key in list(os.environ):
            if key.startswith("IMMUTANT_"):
                del os.environ[key]
        stats_client = redis.Redis(unix_socket_path=str(store.socket))

        def immutant(app: Any) -> None:
            app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_SESSIONS=True)
            ImmutantExtension(app)

        def immutant_no_near(app: Any) -> None:
            app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_SESSIONS=True, IMMUTANT_SESSION_NEAR_ENTRIES=0)
            ImmutantExtension(app)

        def flask_session(app: Any) -> None:
            app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis(unix_socket_path=str(store.socket)))
            Session(app)

        print(f"session benchmark: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"redis-server {stats_client.info()['redis_version']} on a unix socket; best of {args.repeat} x "
              f"{args.requests} requests (rounds interleaved) to a view reading two session keys, one thread, "
              "Flask test client")
        apps = [build("bench_immutant", immutant), build("bench_immutant_no_near", immutant_no_near),
                build("bench_flask_session", flask_session)]
        ours, no_near, peer = measure(apps, args.requests, args.repeat, stats_client)
        for label, (rate, commands, writes) in (("flask-immutant sessions", ours),
                                                ("flask-immutant, no near cache", no_near),
                                                ("Flask-Session 0.8 (redis)", peer)):
            print(f"  {label:<30} {rate:>9,.0f} requests/s   {1e6 / rate:>7.1f} us/request   "
                  f"{commands:.2f} store commands and {writes:.2f} writes per request")
        print(f"  ratio: {ours[0] / peer[0]:.2f}x (no near cache: {no_near[0] / peer[0]:.2f}x)")
        for app in apps[:2]:
            app.session_interface.close()
        stats_client.close()
    finally:
        store.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
