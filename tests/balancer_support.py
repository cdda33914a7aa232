"""Helpers for the balancer tests: a real HAProxy process, the balancer commands as real
processes, and tiny HTTP backends that stand in for app runtimes."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask_immutant.balancer.haproxy import RuntimeAPI, render_config

from support import NodeProcess, port_is_free, wait_until


def haproxy_binary() -> str:
    """HAProxy must be installed (``.ci/run`` installs it): these tests are never skipped."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    assert found, "haproxy is not installed: run `apt-get install haproxy` (.ci/run does)"
    return found


def free_port() -> int:
    import socket

    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port_is_free(port):
            return port
    raise RuntimeError("no free port")


class HAProxyProcess:
    """HAProxy in the foreground (``-db``, no master-worker), with a generated configuration."""

    def __init__(self, folder: Path, context_paths: list[str], cluster: str) -> None:
        self.folder = folder
        self.socket = str(folder / "haproxy.sock")
        self.port = free_port()
        self.config = folder / "haproxy.cfg"
        self.config.write_text(render_config(context_paths, bind=f"127.0.0.1:{self.port}", socket_path=self.socket,
                                             cookie_key=cluster))
        self.api = RuntimeAPI(self.socket)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        log = open(self.folder / "haproxy.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(self.config)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        wait_until(self._answers, timeout=10, message=f"HAProxy's runtime API on {self.socket}")

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, (self.folder / "haproxy.log").read_text()
        try:
            return "Pid" in self.api.execute("show info")
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def servers(self, backend: str = "ctx") -> dict[str, Any]:
        return self.api.servers(backend)


@contextlib.contextmanager
def running_haproxy(folder: Path, context_paths: list[str], cluster: str) -> Iterator[HAProxyProcess]:
    haproxy = HAProxyProcess(folder, context_paths, cluster)
    try:
        haproxy.start()
        yield haproxy
    finally:
        haproxy.stop()


def start_embedded(env: dict[str, str], cwd: Path, *args: str) -> tuple[NodeProcess, str]:
    """``flask immutant balancer --port 0``; returns the process and its URL."""
    process = NodeProcess(["immutant", "balancer", "--port", "0", *args], env, cwd=cwd)
    match = process.wait_for(r"balancer listening on (http://[\d.]+:\d+)", timeout=20)
    return process, match.group(1)


def start_reconciler(env: dict[str, str], cwd: Path, socket_path: str) -> NodeProcess:
    process = NodeProcess(["immutant", "balancer", "--haproxy", socket_path], env, cwd=cwd)
    process.wait_for("reconciling HAProxy", timeout=20)
    return process


class Backend:
    """A tiny threaded HTTP server standing in for an app runtime: ``/who`` names it, ``/echo``
    streams a request body back (with its sha256), ``/bytes?n=N`` streams N bytes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                backend.hits += 1
                if self.path.startswith("/bytes"):
                    n = int(self.path.split("n=", 1)[1])
                    self.send_response(200)
                    self.send_header("Content-Length", str(n))
                    self.end_headers()
                    block = b"x" * 65536
                    sent = 0
                    while sent < n:
                        self.wfile.write(block[: n - sent])
                        sent += min(len(block), n - sent)
                    return
                self._send(200, json.dumps({"node": backend.name, "path": self.path,
                                            "cookie": self.headers.get("Cookie")}).encode(),
                           {"Content-Type": "application/json", "Set-Cookie": "app=1; Path=/"})

            do_HEAD = do_GET
            do_DELETE = do_GET

            def do_POST(self) -> None:
                backend.hits += 1
                length = int(self.headers.get("Content-Length") or 0)
                digest = hashlib.sha256()
                left = length
                while left:
                    chunk = self.rfile.read(min(65536, left))
                    if not chunk:
                        break
                    digest.update(chunk)
                    left -= len(chunk)
                self._send(200, json.dumps({"node": backend.name, "sha256": digest.hexdigest(),
                                            "length": length - left}).encode(), {"Content-Type": "application/json"})

            do_PUT = do_POST

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # health checks connect and hang up

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
