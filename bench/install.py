"""How long a new user waits from ``pip install`` to a serving node, per Python interpreter.

A benchmark, not a test: it prints figures and asserts nothing. For each interpreter it makes a
fresh virtualenv and times, from a warm pip cache (one untimed install first fills it):

- **install**: ``pip install -e SOURCE`` (the Quick start's first command, without the run);
- **serve**: ``python -m flask --app example_app/app immutant run --clustered`` in a fresh
  ``IMMUTANT_HOME`` (the node also starts the embedded store) until its first HTTP 200;
- **peer**: ``pip install flask`` in another fresh virtualenv, then ``flask run`` of a one-route
  app until its first HTTP 200: the least a Flask app needs.

The untimed warming install is reported too: on an interpreter with no wheel for a dependency it
is where pip compiles (what a user without a pip cache waits).

    python bench/install.py --python python3.11 --python /root/.pyenv/versions/3.13.0/bin/python3.13 [--source .]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = "example_app/app"
DEADLINE = 120.0
PEER_APP = "from flask import Flask\napp = Flask(__name__)\n\n@app.get('/')\ndef index():\n    return 'hi'\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_", "VIRTUAL_ENV"))}
    env.update(PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()[-800:]}")
    return took


@contextlib.contextmanager
def venv(python: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="imb-venv-"))
    try:
        subprocess.run([python, "-m", "venv", str(folder)], check=True)
        yield folder / "bin" / "python"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def time_to_http(args: list[str], source: Path, env: dict[str, str], port: int) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=source, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.perf_counter() - started < DEADLINE:
            if http_ok(port):
                return time.perf_counter() - started
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(args)} exited with status {proc.returncode}")
            time.sleep(0.01)
        raise RuntimeError(f"{' '.join(args)}: no HTTP 200 within {DEADLINE:g}s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(python: str, source: Path) -> dict[str, float | str]:
    env = clean_environ()
    with venv(python) as py:
        version = subprocess.run([py, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        warming = timed([str(py), "-m", "pip", "install", "-q", "-e", str(source)], source, env)
    with venv(python) as py:
        install = timed([str(py), "-m", "pip", "install", "-q", "-e", str(source)], source, env)
        home = Path(tempfile.mkdtemp(prefix="imb-"))
        port = free_port()
        try:
            node_env = clean_environ(IMMUTANT_HOME=str(home), IMMUTANT_HTTP_PORT=str(port),
                                     IMMUTANT_CLUSTER=f"bench{os.getpid()}")
            serve = time_to_http([str(py), "-m", "flask", "--app", APP, "immutant", "run", "--clustered"],
                                 source, node_env, port)
            which = "from flask_immutant.store.embedded import redis_server_binary as b; print(b())"
            server = subprocess.run([str(py), "-c", which], cwd=home, capture_output=True, text=True,
                                    check=False).stdout.strip()  # not from cwd: the installed package
        finally:
            subprocess.run([str(py), "-m", "flask", "immutant", "store", "stop"], cwd=home,
                           env=clean_environ(IMMUTANT_HOME=str(home)), capture_output=True, check=False)
            shutil.rmtree(home, ignore_errors=True)
    with venv(python) as py:
        peer_install = timed([str(py), "-m", "pip", "install", "-q", "flask"], source, env)
        port = free_port()
        folder = Path(tempfile.mkdtemp(prefix="imb-peer-"))
        (folder / "hello.py").write_text(PEER_APP)
        try:
            peer_serve = time_to_http([str(py), "-m", "flask", "--app", "hello", "run", "--port", str(port)],
                                      folder, clean_environ(), port)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return {"python": version, "warming": warming, "install": install, "serve": serve, "server": server,
            "peer_install": peer_install, "peer_serve": peer_serve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", required=True, help="interpreter to measure (repeatable)")
    parser.add_argument("--source", default=str(ROOT), help="the source tree to install (default: this one)")
    options = parser.parse_args(argv)
    source = Path(options.source).resolve()
    print(f"source {source}; {os.cpu_count()} CPUs", flush=True)
    for python in options.python:
        r = measure(python, source)
        total = float(r["install"]) + float(r["serve"])
        peer = float(r["peer_install"]) + float(r["peer_serve"])
        print(f"python {r['python']}: warming install {r['warming']:.1f}s | warm install {r['install']:.1f}s + "
              f"node to HTTP 200 {r['serve']:.2f}s = {total:.1f}s | peer (pip install flask + flask run) "
              f"{peer:.1f}s | ratio {total / peer:.2f}x | store server {r['server']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
