"""How long a scrape of a node's metrics path takes, on a node with 50 destinations.

A benchmark, not a test: it prints figures and asserts nothing. It starts one real node
(``flask --app APP immutant run`` with ``IMMUTANT_METRICS=1``) in a fresh ``IMMUTANT_HOME``
whose app listens on 50 queues, publishes a few messages to each (so every per-destination
series exists, and each queue has a depth to read), then GETs ``/-/immutant/metrics`` over one
keep-alive connection as Prometheus does, ``--scrapes`` times ``--interval`` seconds apart (0.1 s:
far more often than Prometheus's 15 s default), and reports p50/p99/max.

The peer, measured in the same run on the same node and connection: a GET of a trivial route of
the same app (the HTTP floor: waitress, Flask and the runtime's WSGI layers). The target is a
p99 under 50 ms.

    python bench/metrics_scrape.py [--destinations 50] [--scrapes 500]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from flask_immutant.metrics.http import METRICS_PATH
from flask_immutant.store import EmbeddedStore

APP = textwrap.dedent("""
    import os
    from flask import Flask
    from flask_immutant import ImmutantExtension

    immutant = ImmutantExtension()
    COUNT = int(os.environ["BENCH_DESTINATIONS"])
    NAMES = [f"/queue/bench-{i:02d}" for i in range(COUNT)]

    def handler(body):
        pass

    for name in NAMES:
        immutant.listen(name)(handler)

    app = Flask(__name__)
    app.config.update(IMMUTANT_METRICS=True)
    immutant.init_app(app)

    @app.get("/ping")
    def ping():
        return "pong"

    @app.post("/publish")
    def publish():
        for name in NAMES:
            immutant.publish_many(name, range(5))
            immutant.publish(name, "waits", delay=3600)  # stays delayed: the depth read has work
        return "ok"
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def timed_gets(port: int, path: str, count: int, interval: float = 0.0) -> tuple[list[float], int]:
    """Milliseconds of each of ``count`` GETs of ``path`` over one keep-alive connection,
    ``interval`` seconds apart, and the size of the last body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    samples, size = [], 0
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            samples.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"GET {path} answered {response.status}: {body[:200]!r}")
            size = len(body)
            time.sleep(interval)
    finally:
        connection.close()
    return samples, size


def render_cpu(home: Path, count: int) -> list[float]:
    """CPU milliseconds (this thread's) of rendering the node's multi-process files ``count``
    times in this process: the scrape's own work, without the node's threads or the machine's
    other load (which a wall-clock figure includes)."""
    from flask_immutant.metrics import process

    os.environ[process.MULTIPROC_ENV] = str(next((home / "nodes").glob(f"*/{process.FOLDER}")))
    samples = []
    for _ in range(count):
        started = time.thread_time()
        process.render()
        samples.append((time.thread_time() - started) * 1000)
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--destinations", type=int, default=50)
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between two GETs (Prometheus scrapes a target every 15 s by default)")
    options = parser.parse_args()

    load = os.getloadavg()
    home = Path(tempfile.mkdtemp(prefix="imt-bench-"))
    port = free_port()
    (home / "bench_app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
    env.update(IMMUTANT_HOME=str(home), IMMUTANT_HTTP_PORT=str(port), IMMUTANT_METRICS="1",
               BENCH_DESTINATIONS=str(options.destinations), PYTHONUNBUFFERED="1")
    log = (home / "node.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "flask", "--app", "bench_app", "immutant", "run"], cwd=home,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                timed_gets(port, "/ping", 1)
                break
            except (OSError, RuntimeError):
                if time.monotonic() > deadline or node.poll() is not None:
                    raise SystemExit("the node did not serve within 60 s:\n"
                                     + (home / "node.log").read_text()[-3000:]) from None
                time.sleep(0.2)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/publish")
        assert connection.getresponse().read() == b"ok"
        connection.close()
        time.sleep(2)  # the listeners handle what was not delayed

        timed_gets(port, METRICS_PATH, 20)  # warm-up: imports, first files, connections
        timed_gets(port, "/ping", 20)
        scrape, size = timed_gets(port, METRICS_PATH, options.scrapes, options.interval)
        floor, _ = timed_gets(port, "/ping", options.scrapes, options.interval)
        cpu = render_cpu(home, options.scrapes)
    finally:
        log.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        EmbeddedStore(home).stop()
        shutil.rmtree(home, ignore_errors=True)

    print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{options.destinations} destinations, {options.scrapes} GETs each {options.interval:g} s apart, "
          "one keep-alive connection")
    print(f"load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
    print(f"{'':28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, samples in ((f"GET {METRICS_PATH}", scrape), ("GET /ping (peer: HTTP floor)", floor),
                           ("render only, CPU ms", cpu)):
        print(f"{label:28} {statistics.median(samples):8.2f} {percentile(samples, 0.99):8.2f} {max(samples):8.2f}")
    print(f"scrape body: {size} bytes; p99 target 50 ms: {'met' if percentile(scrape, 0.99) < 50 else 'MISSED'}")
    print(f"ratio scrape/peer: p50 {statistics.median(scrape) / statistics.median(floor):.1f}x, "
          f"p99 {percentile(scrape, 0.99) / percentile(floor, 0.99):.1f}x")


if __name__ == "__main__":
    main()
