"""Deploy-to-serving time on two nodes, and failed requests during redeploys under load.

    python bench/deploy.py [--runs 5] [--clients 8] [--redeploys 5]

Targets (issue 6): deploy to serving on both nodes <= 2 s; 0 failed requests during redeploy.
The load uses keep-alive connections (the hard case: a draining runtime must not drop them).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

from flask_immutant.store import EmbeddedStore

APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension
app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)
VERSION = {version}

@app.get("/")
def index():
    return str(VERSION)
'''


def free_port() -> int:
    """A port that is free, and free 100 above too (the second node's offset): on a shared machine
    a port taken there left the second node unable to bind, and the bench waiting for ever."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + 100 < 65536:
            with socket.socket() as other:
                try:
                    other.bind(("127.0.0.1", port + 100))
                except OSError:
                    continue
            return port


def wait_for(ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``ready`` until it holds; a bench that cannot measure says so rather than hanging."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/deploy.py: {what} did not happen within {timeout:.0f}s")
        time.sleep(0.01)


def flask(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flask", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, check=False)


def serving(port: int, version: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=1).text == str(version)
    except requests.RequestException:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--redeploys", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="imt-bench-"))
    app_dir = home / "benchapp"
    app_dir.mkdir()
    base = free_port()
    env = {**os.environ, "IMMUTANT_HOME": str(home), "IMMUTANT_CLUSTER": "bench", "IMMUTANT_HTTP_PORT": str(base)}
    ports = [base, base + 100]
    nodes = [subprocess.Popen([sys.executable, "-m", "flask", "immutant", "run", "--clustered", "--port-offset",
                               str(port - base)], env=env, cwd=home, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True) for port in ports]
    version = 0
    try:
        time.sleep(3)
        times = []
        for _ in range(args.runs):
            version += 1
            (app_dir / "app.py").write_text(APP.format(version=version))
            started = time.monotonic()
            result = flask(["immutant", "deploy", "--wait", "0"], env, app_dir)
            # --wait 0 returns at once and exits non-zero ("no answer within 0s"): the nodes' HTTP is the answer
            assert "registered" in result.stdout, result.stdout + result.stderr
            wait_for(lambda v=version: all(serving(port, v) for port in ports), f"both nodes serving version {version}")
            times.append(time.monotonic() - started)
            flask(["immutant", "undeploy", "benchapp"], env, app_dir)
        version += 1
        (app_dir / "app.py").write_text(APP.format(version=version))
        flask(["immutant", "deploy"], env, app_dir)

        ok, failed = [0], [0]
        errors: list[str] = []
        stop = threading.Event()

        def load() -> None:
            session = requests.Session()
            while not stop.is_set():
                try:
                    response = session.get(f"http://127.0.0.1:{base}/", timeout=10)
                    if response.status_code == 200:
                        ok[0] += 1
                        continue
                    errors.append(f"HTTP {response.status_code}")
                except requests.RequestException as exc:
                    errors.append(type(exc).__name__)
                failed[0] += 1

        threads = [threading.Thread(target=load) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        load_started = time.monotonic()
        for _ in range(args.redeploys):
            version += 1
            (app_dir / "app.py").write_text(APP.format(version=version))
            result = flask(["immutant", "deploy"], env, app_dir)
            wait_for(lambda v=version: serving(base, v), f"the first node serving version {version} (deploy said: "
                     f"{(result.stdout + result.stderr).strip()[-400:]})")
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - load_started
        print(f"deploy -> serving on 2 nodes (includes the deploy command's start-up), n={len(times)}: "
              f"median {statistics.median(times):.2f}s  max {max(times):.2f}s  (target <= 1.0 s)")
        print(f"redeploys under keep-alive load: {args.redeploys} redeploys, {args.clients} clients, "
              f"{ok[0] + failed[0]} requests in {elapsed:.1f}s ({(ok[0] + failed[0]) / elapsed:.0f} req/s), "
              f"failed {failed[0]}  (target 0){'  ' + ', '.join(sorted(set(errors))) if errors else ''}")
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        EmbeddedStore(home).stop()


if __name__ == "__main__":
    main()
