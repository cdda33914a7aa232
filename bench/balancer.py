"""Requests/s and latency: straight to a node, through HAProxy, through the embedded balancer.

    python bench/balancer.py [--seconds 5] [--rounds 2] [--clients 8] [--size 0] [--profile FILE]

One run starts, in a temporary IMMUTANT_HOME and on free loopback ports: one node serving a
tiny app, HAProxy (generated configuration, servers added by the reconciler) and the embedded
balancer. A keep-alive aiohttp load generator (``--clients`` concurrent connections) then hits
each target for ``--seconds``, the three interleaved for ``--rounds`` rounds so machine noise
falls on all of them; ratios are to the direct figures of the same run, and embedded / HAProxy is
also given round by round (the median of those is the figure least moved by other load). The CPU
each proxy process used per request (utime + stime from /proc, all its threads) is printed too:
unlike requests/s, it hardly moves with the machine's load. ``--profile FILE`` records the
embedded balancer with py-spy (``--profile-format``, default speedscope) during its rounds. Needs
haproxy on PATH or at /usr/sbin/haproxy. Everything started is stopped at the end, even after an
error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from flask_immutant.balancer.haproxy import render_config
from flask_immutant.keys import Keys
from flask_immutant.store import EmbeddedStore

APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension
app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)
BODY = b"x" * {size}

@app.get("/")
def index():
    return BODY or b"ok"
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if condition():
                return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


async def load(url: str, seconds: float, clients: int) -> tuple[int, list[float]]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < deadline:
                try:
                    async with session.get(url) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return errors, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", type=int, default=0, help="response body bytes (0: a 2-byte body)")
    parser.add_argument("--profile", help="record the embedded balancer with py-spy into this file")
    parser.add_argument("--profile-format", default="speedscope", help="py-spy --format: speedscope, flamegraph, raw")
    args = parser.parse_args()
    haproxy_bin = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(haproxy_bin):
        raise SystemExit("haproxy is not installed")

    home = Path(tempfile.mkdtemp(prefix="imb-"))
    cluster = "bench"
    node_port, haproxy_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
    env.update(IMMUTANT_HOME=str(home), IMMUTANT_CLUSTER=cluster, IMMUTANT_HTTP_PORT=str(node_port),
               PYTHONUNBUFFERED="1")
    (home / "app.py").write_text(APP.format(size=args.size))
    processes: list[subprocess.Popen[bytes]] = []
    store = EmbeddedStore(home)

    def spawn(command: list[str]) -> subprocess.Popen[bytes]:
        log = open(home / f"log-{len(processes)}.txt", "wb")  # noqa: SIM115 - closed below
        process = subprocess.Popen(command, env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        processes.append(process)
        return process

    try:
        store.ensure_running()
        node = spawn([sys.executable, "-m", "flask", "--app", str(home / "app.py"), "immutant", "run", "--clustered",
               "--node-name", "n1"])
        direct = f"http://127.0.0.1:{node_port}/"
        wait(lambda: ok(direct), 30, "the node")
        client = store.client()
        wait(lambda: client.scard(Keys(cluster).contexts), 10, "the node's context")
        client.close()

        socket_path = str(home / "haproxy.sock")
        (home / "haproxy.cfg").write_text(render_config(["/"], bind=f"127.0.0.1:{haproxy_port}",
                                                        socket_path=socket_path, cookie_key=cluster))
        spawn([haproxy_bin, "-db", "-f", str(home / "haproxy.cfg")])
        wait(lambda: os.path.exists(socket_path), 10, "haproxy's socket")
        haproxy = processes[-1]
        spawn([sys.executable, "-m", "flask", "immutant", "balancer", "--haproxy", socket_path])
        through_haproxy = f"http://127.0.0.1:{haproxy_port}/"
        wait(lambda: ok(through_haproxy), 15, "haproxy serving through the reconciler's server")

        embedded_port = free_port()
        embedded = spawn([sys.executable, "-m", "flask", "immutant", "balancer", "--port", str(embedded_port),
                          "--no-console"])
        through_embedded = f"http://127.0.0.1:{embedded_port}/"
        wait(lambda: ok(through_embedded), 15, "the embedded balancer")

        targets = {"direct": direct, "haproxy": through_haproxy, "embedded": through_embedded}
        results: dict[str, list[float]] = {name: [] for name in targets}
        counts: dict[str, int] = dict.fromkeys(targets, 0)
        errors: dict[str, int] = dict.fromkeys(targets, 0)
        proxies = {"haproxy": haproxy.pid, "embedded": embedded.pid}
        cpu: dict[str, float] = dict.fromkeys(proxies, 0.0)
        node_cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        load_cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        round_ratios: list[float] = []
        profiler: subprocess.Popen[bytes] | None = None
        for url in targets.values():  # warm-up: connections, code paths
            asyncio.run(load(url, 1.0, args.clients))
        for _round in range(args.rounds):
            in_round: dict[str, int] = {}
            for name, url in targets.items():
                if name == "embedded" and args.profile and profiler is None:
                    profiler = _py_spy(embedded.pid, args.profile, args.profile_format)
                if name == "embedded" and profiler is not None:
                    os.kill(profiler.pid, signal.SIGCONT)
                before = _cpu_seconds(proxies[name]) if name in proxies else 0.0
                node_before, load_before = _group_cpu_seconds(node.pid), _own_cpu_seconds()
                failed, latencies = asyncio.run(load(url, args.seconds, args.clients))
                if name in proxies:
                    cpu[name] += _cpu_seconds(proxies[name]) - before
                node_cpu[name] += _group_cpu_seconds(node.pid) - node_before
                load_cpu[name] += _own_cpu_seconds() - load_before
                if name == "embedded" and profiler is not None:
                    os.kill(profiler.pid, signal.SIGSTOP)
                errors[name] += failed
                counts[name] += len(latencies)
                in_round[name] = len(latencies)
                results[name] += latencies
            round_ratios.append(in_round["embedded"] / max(1, in_round["haproxy"]))
        if profiler is not None:
            os.kill(profiler.pid, signal.SIGCONT)
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)

        seconds = args.seconds * args.rounds
        print(f"{args.clients} keep-alive clients, {args.rounds} x {args.seconds:g} s per target, "
              f"body {args.size or 2} bytes, {os.cpu_count()} CPUs")
        base_rps = counts["direct"] / seconds
        base_p99 = _p(results["direct"], 99)
        for name in targets:
            rps = counts[name] / seconds
            p50, p99 = _p(results[name], 50), _p(results[name], 99)
            print(f"{name:<9} {rps:8.0f} req/s ({rps / base_rps:4.2f}x direct)   p50 {p50 * 1000:6.2f} ms   "
                  f"p99 {p99 * 1000:6.2f} ms ({p99 / base_p99:4.2f}x direct)   errors {errors[name]}")
        print(f"embedded / haproxy: {counts['embedded'] / max(1, counts['haproxy']):4.2f}x over the run, "
              f"median of rounds {statistics.median(round_ratios):4.2f}x "
              f"(rounds: {' '.join(f'{r:.2f}' for r in round_ratios)})")
        print("CPU per request (us):     proxy    node   load generator")
        for name in targets:
            per = 1e6 / max(1, counts[name])
            proxy = f"{cpu[name] * per:8.1f}" if name in proxies else "       -"
            print(f"{name:<9}               {proxy} {node_cpu[name] * per:7.1f} {load_cpu[name] * per:8.1f}")
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            store.stop(timeout=5)
        shutil.rmtree(home, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_cpu_seconds(pgid: int) -> float:
    """CPU of every live process in a process group (a node: its supervisor and runtimes)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _py_spy(pid: int, output: str, fmt: str) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid``, stopped (SIGSTOP) outside the embedded balancer's rounds."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    process = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", fmt,
                                "--output", output, "--nonblocking"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return process


def _p(samples: list[float], percentile: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else float("nan")
    return statistics.quantiles(samples, n=100)[percentile - 1]


if __name__ == "__main__":
    main()
