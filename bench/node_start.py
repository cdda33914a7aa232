"""How long a node takes from ``flask immutant run`` to serving HTTP and to joining the cluster.

A benchmark, not a test: it prints figures and asserts nothing. Each round starts real processes:

- **cold**: ``python -m flask --app example_app/app immutant run --clustered`` in a fresh
  ``IMMUTANT_HOME``, so the node must also start the embedded store;
- **warm**: the same command again, with that store already running (a second node of the machine);
- **flask run**: ``python -m flask --app example_app/app run``, Flask's development server, as the
  peer: the least a Flask app needs to answer HTTP.

For the nodes it measures the time from spawn to (a) the first HTTP 200 from the node's port and
(b) the node's supervisor appearing among the cluster's live members (read straight from the
store with :func:`flask_immutant.cluster.live_members`), then (c) the time a SIGTERM takes to stop
the node. Each node is stopped (SIGTERM, then SIGKILL of its process group) before the next starts;
every embedded store is stopped at the end.

    python bench/node_start.py [--runs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from flask_immutant.cluster import live_members
from flask_immutant.keys import Keys
from flask_immutant.store import EmbeddedStore

ROOT = Path(__file__).resolve().parent.parent
#: The app every process serves, as ``flask --app`` takes it, relative to the repository root.
APP = "example_app/app"
#: Seconds between two polls of the same condition.
POLL_INTERVAL = 0.005
#: Seconds a process gets to reach each condition before the round fails.
DEADLINE = 60.0
#: The failure timeout the nodes run with (the default); ``live_members`` needs it.
FAILURE_TIMEOUT = 2.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@contextlib.contextmanager
def spawned(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session, stopped (terminate, then killpg) whatever happens."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> float | None:
    """SIGTERM and wait; SIGKILL the whole process group after ``timeout``. Returns the seconds a
    graceful stop took, or None if the process was already gone or had to be killed."""
    took: float | None = None
    if proc.poll() is None:
        started = time.perf_counter()
        proc.terminate()
        try:
            wait_exit(proc, timeout)
            took = time.perf_counter() - started
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    return took


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """``proc.wait(timeout)``, woken by the exit itself where Linux offers a pidfd: with a timeout,
    ``Popen.wait`` polls with sleeps that double up to 50 ms, which rounded every stop time up to
    the next step of 0.5, 1.5, 3.5 ... 63.5, 113.5, 163.5 ms."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(AttributeError, OSError):  # no pidfd here: Popen.wait polls
        pidfd = os.pidfd_open(proc.pid)
        try:
            select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
    return proc.wait(max(0.0, deadline - time.monotonic()))


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def first_time(condition: Callable[[], bool], t0: float, proc: subprocess.Popen[bytes], what: str) -> float:
    """Seconds from ``t0`` until ``condition()`` first holds; fails if the process exits first."""
    deadline = t0 + DEADLINE
    while time.perf_counter() < deadline:
        if condition():
            return time.perf_counter() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")
        time.sleep(POLL_INTERVAL)
    raise RuntimeError(f"{what}: not within {DEADLINE:g}s")


def measure_node(home: Path, log: Path) -> dict[str, float]:
    """One node start: seconds to HTTP 200, to membership, and for a graceful stop."""
    port = free_port()
    cluster = f"bench-{uuid.uuid4().hex[:8]}"
    env = clean_environ(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=cluster, IMMUTANT_HTTP_PORT=str(port))
    keys = Keys(cluster)
    embedded = EmbeddedStore(home)
    # No retries: redis-py's default backoff would blur a poll by up to seconds on a cold start.
    store = embedded.client(socket_timeout=1.0, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    args = [sys.executable, "-m", "flask", "--app", APP, "immutant", "run", "--clustered"]
    results: dict[str, float] = {}
    errors: list[BaseException] = []
    try:
        t0 = time.perf_counter()
        with spawned(args, env, log) as proc:

            def is_member() -> bool:
                if not embedded.socket.exists():
                    return False  # the node has not started the store yet (cold start)
                try:
                    members = live_members(store, keys, FAILURE_TIMEOUT)
                except redis.RedisError:
                    return False  # the store is starting
                return any(member.pid == proc.pid for member in members)

            def watch(name: str, condition: Callable[[], bool]) -> None:
                try:
                    results[name] = first_time(condition, t0, proc, name)
                except BaseException as exc:  # re-raised in the main thread
                    errors.append(exc)

            threads = [
                threading.Thread(target=watch, args=("http", lambda: http_ok(port))),
                threading.Thread(target=watch, args=("member", is_member)),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            took = stop(proc)
            if took is not None:
                results["stop"] = took
    finally:
        store.close()
    return results


def measure_flask_run(home: Path, log: Path) -> float:
    """Seconds from spawning Flask's development server to its first HTTP 200."""
    port = free_port()
    env = clean_environ(IMMUTANT_HOME=str(home))
    args = [sys.executable, "-m", "flask", "--app", APP, "run", "--port", str(port)]
    t0 = time.perf_counter()
    with spawned(args, env, log) as proc:
        return first_time(lambda: http_ok(port), t0, proc, "flask run")


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"median {statistics.median(values) * 1000:7.0f} ms   min {min(values) * 1000:7.0f} ms   "
            f"max {max(values) * 1000:7.0f} ms   (n={len(values)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds of cold node, warm node and flask run")
    parser.add_argument("--json", action="store_true", help="also print every sample as JSON")
    options = parser.parse_args(argv)
    if options.runs < 1:
        parser.error("--runs must be at least 1")

    samples: dict[str, list[float]] = {key: [] for key in (
        "cold_http", "cold_member", "warm_http", "warm_member", "node_stop", "flask_run_http")}
    homes: list[Path] = []
    logdir = Path(tempfile.mkdtemp(prefix="imb-logs-"))
    print(f"python {platform.python_version()} on {platform.system()} {platform.machine()}, "
          f"{os.cpu_count()} CPUs; app {APP}; logs in {logdir}", flush=True)
    try:
        for run in range(1, options.runs + 1):
            home = Path(tempfile.mkdtemp(prefix="imb-"))  # short: unix socket paths are limited
            homes.append(home)
            cold = measure_node(home, logdir / f"cold-{run}.log")
            warm = measure_node(home, logdir / f"warm-{run}.log")
            peer = measure_flask_run(home, logdir / f"flask-run-{run}.log")
            EmbeddedStore(home).stop()
            samples["cold_http"].append(cold["http"])
            samples["cold_member"].append(cold["member"])
            samples["warm_http"].append(warm["http"])
            samples["warm_member"].append(warm["member"])
            samples["node_stop"].extend(r["stop"] for r in (cold, warm) if "stop" in r)
            samples["flask_run_http"].append(peer)
            print(f"run {run}: cold http {cold['http']:.3f}s member {cold['member']:.3f}s | "
                  f"warm http {warm['http']:.3f}s member {warm['member']:.3f}s | "
                  f"flask run http {peer:.3f}s", flush=True)
    finally:
        for home in homes:
            with contextlib.suppress(Exception):
                EmbeddedStore(home).stop()
            shutil.rmtree(home, ignore_errors=True)

    print()
    print("spawn -> HTTP 200, node, cold store  ", summary(samples["cold_http"]))
    print("spawn -> member,   node, cold store  ", summary(samples["cold_member"]))
    print("spawn -> HTTP 200, node, store up    ", summary(samples["warm_http"]))
    print("spawn -> member,   node, store up    ", summary(samples["warm_member"]))
    print("SIGTERM -> exit,   node              ", summary(samples["node_stop"]))
    print("spawn -> HTTP 200, flask run (peer)  ", summary(samples["flask_run_http"]))
    peer = statistics.median(samples["flask_run_http"])
    for label, key in (("cold store", "cold_http"), ("store up", "warm_http")):
        print(f"node / flask run, HTTP 200 medians, {label}: {statistics.median(samples[key]) / peer:.2f}x")
    if options.json:
        print(json.dumps(samples, indent=2))
    shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
