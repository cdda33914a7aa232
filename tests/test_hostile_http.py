"""Hostile HTTP against real processes, over raw sockets: the console and the embedded balancer
answer every request (401/403/400, never 500), one rule decides where the console may be
served, and the app behind the balancer sees the real client (and only the balancer may say so)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from balancer_support import Backend, free_port, start_embedded

from flask_immutant.balancer import registry
from flask_immutant.keys import Keys

from support import NodeProcess, run_flask, wait_until


def exchange(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to 127.0.0.1:``port``; the whole answer (the server closes after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# --- the console, on its own and mounted in the balancer ---------------------------------------


@pytest.fixture
def console(node_env: dict[str, str], tmp_path: Path) -> Iterator[int]:
    port = free_port()
    process = NodeProcess(["immutant", "console", "--port", str(port)], node_env, cwd=tmp_path)
    try:
        process.wait_for("console for cluster", timeout=20)
        yield port
    finally:
        process.cleanup()


@pytest.fixture
def balancer(node_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    process, url = start_embedded(node_env, tmp_path)
    try:
        yield url
    finally:
        process.cleanup()


HOSTILE_CREDENTIALS = [
    ("Authorization", b"Bearer \xff\xfe\xc3\x28secret"),
    ("Authorization", "Bearer sécret".encode()),
    ("Cookie", b"immutant_console=9999999999.\xff\xfe.\xe9\xe9"),
    ("Cookie", "immutant_console=9999999999.nonce.é".encode()),
]


def _hostile_requests(prefix: str) -> Iterator[tuple[bytes, tuple[int, ...]]]:
    for name, value in HOSTILE_CREDENTIALS:
        head = f"GET {prefix}api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
        yield head + name.encode() + b": " + value + b"\r\n\r\n", (401, 403)
    # An action with a good-looking cookie but a hostile CSRF token and origin
    body = b'{"state": "ENABLED"}'
    yield (f"POST {prefix}api/control HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
           + b"Origin: http://\xff\xfe\r\nX-CSRF-Token: \xe9\xe9\r\nCookie: immutant_console=1.2.3\r\n\r\n" + body,
           (401, 403))
    # A login whose secret is a lone surrogate in JSON
    body = b'{"token": "\\ud800"}'
    yield (f"POST {prefix}login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
           + b"Origin: http://127.0.0.1\r\n\r\n" + body, (403,))


def test_the_console_refuses_hostile_credentials_with_401_or_403(console):
    for request, allowed in _hostile_requests("/"):
        answer = exchange(console, request)
        assert status_of(answer) in allowed, (request, answer[:300])


def test_the_mounted_console_refuses_hostile_credentials_with_401_or_403(balancer):
    for request, allowed in _hostile_requests("/_immutant/"):
        answer = exchange(port_of(balancer), request)
        assert status_of(answer) in allowed, (request, answer[:300])


# --- the balancer -----------------------------------------------------------------------------


@pytest.fixture
def backend(store_client, cluster_name) -> Iterator[Backend]:
    served = Backend("x")
    keys = Keys(cluster_name)
    registry.publish(store_client, keys, registry.Context("x", "/", "app", "127.0.0.1", served.port, 100,
                                                          os.getpid(), time.time()), 60)
    registry.announce(store_client, keys, "x|/")
    try:
        yield served
    finally:
        served.close()


@pytest.mark.parametrize("target", [
    "http://evil.example/who", "http://127.0.0.1:1/_immutant/api/session", "evil.example:80", "*",
])
def test_a_request_target_that_is_not_a_path_is_a_400(backend, balancer, target):
    wait_until(lambda: requests.get(f"{balancer}/who", timeout=5).status_code == 200, timeout=10)
    hits = backend.hits
    answer = exchange(port_of(balancer), f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status_of(answer) == 400, answer[:300]
    assert b"Traceback" not in answer
    assert backend.hits == hits  # never forwarded
    assert requests.get(f"{balancer}/who", timeout=5).json()["node"] == "x"  # and the balancer goes on


def test_header_values_that_are_not_ascii_are_forwarded_or_refused_never_a_500(backend, balancer):
    wait_until(lambda: requests.get(f"{balancer}/who", timeout=5).status_code == 200, timeout=10)
    answer = exchange(port_of(balancer), b"GET /who HTTP/1.1\r\nHost: x\r\nX-Odd: \xff\xfe\xc3\x28\r\n"
                                         b"Connection: close\r\n\r\n")
    assert status_of(answer) in (200, 400), answer[:300]


# --- one rule for where the console may be served -----------------------------------------------


REMOTE_REFUSAL = ("Error: --host 0.0.0.0 is not a loopback address; the console controls the cluster, so add "
                  "--allow-remote to serve it there (with TLS in front)")


def test_the_balancer_refuses_to_serve_the_console_remotely_without_allow_remote(node_env):
    result = run_flask(["immutant", "balancer", "--host", "0.0.0.0", "--port", "0"], node_env, timeout=15)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(REMOTE_REFUSAL) and "--no-console" in lines[-1], lines
    console = run_flask(["immutant", "console", "--host", "0.0.0.0"], node_env, timeout=30)
    assert console.stderr.strip().splitlines() == [REMOTE_REFUSAL]


@pytest.mark.parametrize("flag", ["--no-console", "--allow-remote"])
def test_the_balancer_serves_remotely_without_the_console_or_with_allow_remote(node_env, tmp_path, flag):
    process, url = start_embedded(node_env, tmp_path, "--host", "0.0.0.0", flag)
    try:
        answer = exchange(port_of(url), b"GET /_immutant/api/session HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if flag == "--no-console":
            assert status_of(answer) == 503  # proxied like any path, and nothing serves it
        else:
            assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"authenticated": False}
    finally:
        process.cleanup()
