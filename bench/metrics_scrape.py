"""How long a scrape of a node's metrics path takes, on a node with 50 destinations.

A benchmark, not a test: it prints figures and asserts nothing. It starts one real node
(``flask --app APP immutant run`` with ``IMMUTANT_METRICS=1``) in a fresh ``IMMUTANT_HOME``
whose app listens on 50 queues, publishes a few messages to each (so every per-destination
series exists, and each queue has a depth to read), then GETs ``/-/immutant/metrics`` over one
keep-alive connection as Prometheus does, ``--scrapes`` times ``--interval`` seconds apart (0.1 s:
far more often than Prometheus's 15 s default), and reports p50/p95/p99/max.

The peer, measured in the same run on the same node and connection: a GET of a trivial route of
the same app (the HTTP floor: waitress, Flask and the runtime's WSGI layers). The target is a
p99 under 50 ms.

``--against REF`` also starts a second node running the ``flask_immutant`` package of git ref REF
(``git archive`` into a temporary folder, first on ``PYTHONPATH``), with the same app, and
interleaves the two nodes' scrapes in blocks of ten, so that the load of other processes falls on
both alike: a before/after in one run. Both nodes run throughout.

    python bench/metrics_scrape.py [--destinations 50] [--scrapes 500] [--against main]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
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
from dataclasses import dataclass, field
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


def timed_get(connection: http.client.HTTPConnection, path: str) -> tuple[float, bytes]:
    """Milliseconds of one GET of ``path`` on a keep-alive ``connection``, and the body."""
    started = time.perf_counter()
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    elapsed = (time.perf_counter() - started) * 1000
    if response.status != 200:
        raise RuntimeError(f"GET {path} answered {response.status}: {body[:200]!r}")
    return elapsed, body


@dataclass
class Node:
    """One benchmarked node: its own ``IMMUTANT_HOME``, port, store, and the package it runs."""

    label: str
    home: Path
    port: int
    pythonpath: str | None
    process: subprocess.Popen[bytes] | None = None
    connection: http.client.HTTPConnection | None = None
    scrapes: list[float] = field(default_factory=list)
    body: bytes = b""

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_", "PYTHONPATH"))}
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        return env

    def start(self, destinations: int) -> None:
        (self.home / "bench_app.py").write_text(APP)
        env = self.env()
        env.update(IMMUTANT_HOME=str(self.home), IMMUTANT_HTTP_PORT=str(self.port), IMMUTANT_METRICS="1",
                   BENCH_DESTINATIONS=str(destinations), PYTHONUNBUFFERED="1")
        with (self.home / "node.log").open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "flask", "--app", "bench_app", "immutant", "run"],
                                            cwd=self.home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                timed_get(self.connection, "/ping")
                return
            except (OSError, RuntimeError):
                assert self.process is not None
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"the {self.label} node did not serve within 60 s:\n"
                                     + (self.home / "node.log").read_text()[-3000:]) from None
                time.sleep(0.2)

    def publish(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("POST", "/publish")
        assert connection.getresponse().read() == b"ok"
        connection.close()

    def get(self, path: str) -> tuple[float, bytes]:
        assert self.connection is not None
        return timed_get(self.connection, path)

    def folder(self) -> Path:
        from flask_immutant.metrics import process

        return next((self.home / "nodes").glob(f"*/{process.FOLDER}"))

    def stop(self) -> None:
        if self.connection is not None:
            self.connection.close()
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        EmbeddedStore(self.home).stop()
        shutil.rmtree(self.home, ignore_errors=True)


#: Renders a node's folder ``count`` times in a fresh process and prints each render's CPU time.
RENDER = textwrap.dedent("""
    import json, os, sys, time
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from flask_immutant.metrics import process
    process.render()  # warm-up: imports, and what a process keeps from one scrape to the next
    samples = []
    for _ in range(int(sys.argv[2])):
        started = time.thread_time()
        process.render()
        samples.append((time.thread_time() - started) * 1000)
    print(json.dumps({"package": os.path.dirname(process.__file__), "samples": samples}))
""")


def render_cpu(node: Node, count: int) -> tuple[list[float], str]:
    """CPU milliseconds (the rendering thread's) of rendering ``node``'s multi-process files
    ``count`` times in a fresh process running the node's package: the scrape's own work, without
    the node's threads or the machine's other load (which a wall-clock figure includes)."""
    done = subprocess.run([sys.executable, "-c", RENDER, str(node.folder()), str(count)], env=node.env(),
                          cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return result["samples"], result["package"]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def series(body: bytes) -> set[str]:
    """A scrape's series (name and labels, without values)."""
    return {line.rsplit(" ", 1)[0] for line in body.decode().splitlines() if line and not line.startswith("#")}


def checkout(ref: str, into: Path) -> str:
    """``flask_immutant`` of git ref ``ref`` in ``into``; its commit."""
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "flask_immutant"], cwd=root, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--destinations", type=int, default=50)
    parser.add_argument("--scrapes", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.1,
                        help="seconds between two GETs (Prometheus scrapes a target every 15 s by default)")
    parser.add_argument("--against", metavar="REF", default=None,
                        help="also run a node on git ref REF's flask_immutant, scrapes interleaved with this one's")
    options = parser.parse_args()

    load = os.getloadavg()
    nodes = [Node("this tree", Path(tempfile.mkdtemp(prefix="imt-bench-")), free_port(), None)]
    old_tree = None
    if options.against:
        old_tree = Path(tempfile.mkdtemp(prefix="imt-bench-ref-"))
        commit = checkout(options.against, old_tree)
        label = commit if commit.startswith(options.against) else f"{options.against} ({commit})"
        nodes.append(Node(label, Path(tempfile.mkdtemp(prefix="imt-bench-")), free_port(),
                          str(old_tree)))
    floor: list[float] = []
    cpu: dict[str, tuple[list[float], str]] = {}
    block = 10
    try:
        for node in nodes:
            node.start(options.destinations)
        for node in nodes:
            node.wait_serving()
            node.publish()
        time.sleep(2)  # the listeners handle what was not delayed
        for node in nodes:  # warm-up: imports, first files, connections
            for path in [METRICS_PATH] * 20 + ["/ping"] * 20:
                node.get(path)
        for done in range(0, options.scrapes, block):
            for node in nodes:
                for _ in range(min(block, options.scrapes - done)):
                    elapsed, node.body = node.get(METRICS_PATH)
                    node.scrapes.append(elapsed)
                    time.sleep(options.interval)
            for _ in range(min(block, options.scrapes - done)):
                floor.append(nodes[0].get("/ping")[0])
                time.sleep(options.interval)
        for node in nodes:
            cpu[node.label] = render_cpu(node, options.scrapes)
    finally:
        for node in nodes:
            node.stop()
        if old_tree is not None:
            shutil.rmtree(old_tree, ignore_errors=True)

    print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{options.destinations} destinations, {options.scrapes} GETs each {options.interval:g} s apart, "
          f"one keep-alive connection per node{', the nodes interleaved in blocks of 10' if len(nodes) > 1 else ''}")
    print(f"load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
    rows = [(f"GET {METRICS_PATH}, {node.label}", node.scrapes) for node in nodes]
    rows.append(("GET /ping, this tree (peer)", floor))
    rows += [(f"render only CPU ms, {label}", samples) for label, (samples, _) in cpu.items()]
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for label, samples in rows:
        print(f"{label:{width}} {statistics.median(samples):8.2f} {percentile(samples, 0.95):8.2f} "
              f"{percentile(samples, 0.99):8.2f} {max(samples):8.2f}")
    median = statistics.median
    for node in nodes:
        p99 = percentile(node.scrapes, 0.99)
        print(f"{node.label}: body {len(node.body)} bytes, {len(series(node.body))} series; p99 target 50 ms: "
              f"{'met' if p99 < 50 else 'MISSED'}; ratio to the peer p50 {median(node.scrapes) / median(floor):.1f}x, "
              f"p99 {p99 / percentile(floor, 0.99):.1f}x; package {cpu[node.label][1]}")
    if len(nodes) > 1:
        new, old = nodes
        print(f"same series on both nodes: {series(new.body) == series(old.body)}; this tree / {old.label}: "
              f"scrape p50 {median(new.scrapes) / median(old.scrapes):.2f}x, "
              f"p99 {percentile(new.scrapes, 0.99) / percentile(old.scrapes, 0.99):.2f}x, "
              f"render CPU p50 {median(cpu[new.label][0]) / median(cpu[old.label][0]):.2f}x")

if __name__ == "__main__":
    main()
