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

from flask_immutant.contexts import registry
from flask_immutant.keys import Keys

from support import NodeProcess, run_flask, wait_until


def _answer_or_nothing(port: int, request: bytes) -> bytes:
    """:func:`exchange`, with a refused connection (nothing listens yet) as an empty answer."""
    try:
        return exchange(port, request)
    except ConnectionRefusedError:
        return b""


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


def test_hostile_action_fields_are_a_400_even_with_the_secret(node_env, tmp_path):
    port = free_port()
    env = {**node_env, "IMMUTANT_SECRET": "s3cret-for-this-test"}
    process = NodeProcess(["immutant", "console", "--port", str(port)], env, cwd=tmp_path)
    try:
        process.wait_for("console for cluster", timeout=20)
        for field in ('"node": "\\ud800"', '"context_path": "/\\udfff"', '"node": "a\\nb"'):
            body = ('{"state": "DISABLED", ' + field + "}").encode()
            answer = exchange(port, b"POST /api/control HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                                    b"Authorization: Bearer s3cret-for-this-test\r\nContent-Type: application/json\r\n"
                                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert status_of(answer) == 400, (field, answer[:300])
    finally:
        process.cleanup()


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


# --- a real node behind the real balancer ------------------------------------------------------


WHO_APP = r'''
from flask import Flask, jsonify, request
from flask_immutant import ImmutantExtension

app = Flask("who_app")
ImmutantExtension(app)


@app.route("/who", methods=["GET", "POST"])
def who():
    if request.method == "POST":
        request.get_data()
    return jsonify(remote=request.remote_addr, scheme=request.scheme, host=request.host,
                   forwarded_for=request.headers.get("X-Forwarded-For"))
'''


@pytest.fixture
def who_app(tmp_path: Path) -> Path:
    path = tmp_path / "who_app.py"
    path.write_text(WHO_APP)
    return path


def serving_node(start_node, who_app: Path, **env: str) -> int:
    """Start a node serving the app; its HTTP port."""
    node = start_node("--node-name", "web", app=str(who_app), env=env)
    return int(node.wait_for(r"serves on http://[\d.]+:(\d+)", timeout=30).group(1))


def get_from(source: str, port: int, path: str = "/who", headers: str = "", timeout: float = 15.0) -> bytes:
    """A GET sent from the loopback address ``source`` (127.0.0.0/8 is all loopback on Linux)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: example.test\r\n{headers}Connection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def json_of(answer: bytes) -> dict[str, object]:
    assert status_of(answer) == 200, answer[:500]
    return json.loads(answer.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


def test_the_app_sees_the_real_client_through_the_balancer_and_nobody_else_can_say_so(
        start_node, who_app, node_env, tmp_path):
    # Given a node that trusts the balancer's address only, and the balancer in front of it
    node_port = serving_node(start_node, who_app, IMMUTANT_TRUSTED_PROXIES="127.0.0.1")
    process, url = start_embedded(node_env, tmp_path)
    try:
        wait_until(lambda: requests.get(f"{url}/who", timeout=5).status_code == 200, timeout=20)
        # When a client at 127.0.0.2 asks through the balancer, forging headers of its own
        seen = json_of(get_from("127.0.0.2", port_of(url), headers="X-Forwarded-For: 6.6.6.6\r\n"
                                                                   "X-Forwarded-Proto: https\r\n"))
        # Then the app sees the client's real address, the scheme and host the balancer saw
        assert seen["remote"] == "127.0.0.2", seen
        assert seen["scheme"] == "http" and seen["host"] == "example.test", seen
        # When a client at 127.0.0.3 asks the node directly with a forged X-Forwarded-For
        direct = json_of(get_from("127.0.0.3", node_port, headers="X-Forwarded-For: 6.6.6.6\r\n"
                                                                  "X-Forwarded-Proto: https\r\n"))
        # Then it is not believed, and the app never sees the forged header
        assert direct["remote"] == "127.0.0.3" and direct["scheme"] == "http", direct
        assert direct["forwarded_for"] is None, direct
    finally:
        process.cleanup()


def test_with_no_trusted_proxies_nobody_is_believed(start_node, who_app):
    node_port = serving_node(start_node, who_app)
    seen = json_of(get_from("127.0.0.1", node_port, headers="X-Forwarded-For: 6.6.6.6\r\n"))
    assert seen["remote"] == "127.0.0.1" and seen["forwarded_for"] is None, seen


# --- slow and idle clients ---------------------------------------------------------------------


def idle_connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def test_idle_connections_to_a_node_do_not_starve_real_requests(start_node, who_app):
    # Given a node serving an app, and 150 connections to it that never send a byte
    port = serving_node(start_node, who_app)
    idle = idle_connections(port, 150)
    try:
        # Then real requests are still served
        for n in range(5):
            assert json_of(get_from("127.0.0.1", port))["remote"] == "127.0.0.1", n
    finally:
        for sock in idle:
            sock.close()


def test_a_node_with_nothing_deployed_answers_every_connection_at_once(start_node):
    # Given a node with no app, and 60 connections to it that never send a byte
    node = start_node("--node-name", "empty")
    port = int(node.wait_for(r"http=(\d+)", timeout=30).group(1))
    # (the start-up line names the port a moment before it listens: refused meanwhile is "not yet")
    wait_until(lambda: b" 503 " in _answer_or_nothing(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), timeout=20)
    idle = idle_connections(port, 60)
    try:
        # Then a real request still gets its 503 at once, and so did every idle one
        assert status_of(exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 503
        for sock in idle:
            assert sock.recv(100).startswith(b"HTTP/1.1 503"), "an idle connection got no answer"
    finally:
        for sock in idle:
            sock.close()


def test_slow_uploads_through_the_balancer_do_not_starve_real_requests(start_node, who_app, node_env, tmp_path):
    # Given a node behind the balancer, both holding clients to a 6 s request deadline
    limits = {"IMMUTANT_HTTP_READ_TIMEOUT": "6"}
    serving_node(start_node, who_app, **limits)
    process, url = start_embedded({**node_env, **limits}, tmp_path)
    uploads: list[socket.socket] = []
    try:
        wait_until(lambda: requests.get(f"{url}/who", timeout=5).status_code == 200, timeout=20)
        # When 200 clients start uploads and then send one byte every 2 seconds
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", port_of(url)), timeout=10)
            sock.sendall(b"POST /who HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 1000\r\n\r\nx")
            uploads.append(sock)
        answers: dict[socket.socket, bytes] = {}
        for round_ in range(5):
            # Then real requests are served meanwhile
            assert requests.get(f"{url}/who", timeout=15).status_code == 200, round_
            time.sleep(2)
            for sock in uploads:
                if sock in answers:
                    continue
                try:
                    sock.sendall(b"x")
                except OSError:
                    answers[sock] = b"closed"
        # And the slow uploads were cut off at the deadline with a 408
        for sock in uploads:
            if sock not in answers:
                sock.settimeout(15)
                try:
                    answers[sock] = sock.recv(200)
                except OSError:
                    answers[sock] = b"closed"
        assert sum(a.startswith(b"HTTP/1.1 408") for a in answers.values()) >= 150, \
            {a[:40] for a in answers.values()}
    finally:
        for sock in uploads:
            sock.close()
        process.cleanup()


def hung_up_on(sock: socket.socket, drip: bytes, every: float, times: int) -> bool:
    """Send ``drip`` every ``every`` seconds, up to ``times`` times: True once the peer hangs up."""
    for _ in range(times):
        try:
            sock.sendall(drip)
            sock.settimeout(every)
            if sock.recv(100) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_a_node_closes_a_request_that_does_not_arrive_by_the_deadline(start_node, who_app):
    port = serving_node(start_node, who_app, IMMUTANT_HTTP_READ_TIMEOUT="3")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /who HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        # one byte a second, up to 30 s: the node must hang up long before
        assert hung_up_on(sock, b"x", every=1, times=30), "the node kept reading a request past its deadline"
    assert json_of(get_from("127.0.0.1", port))["remote"] == "127.0.0.1"


def test_blank_lines_do_not_keep_an_idle_connection_open(start_node, who_app):
    """HTTP lets a client send empty lines before a request (RFC 9112 2.2); waitress counted
    them as activity, so 4 bytes every few seconds held a connection, and a slot of
    IMMUTANT_HTTP_CONNECTION_LIMIT, for ever past the idle timeout."""
    port = serving_node(start_node, who_app, IMMUTANT_HTTP_IDLE_TIMEOUT="2")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # CRLF CRLF every 0.5 s, up to 10 s: the node must hang up long before
        assert hung_up_on(sock, b"\r\n\r\n", every=0.5, times=20), \
            "the node kept a connection that sent only blank lines past its idle timeout"
    assert json_of(get_from("127.0.0.1", port))["remote"] == "127.0.0.1"


def test_the_balancer_refuses_a_body_over_the_limit_with_413(backend, node_env, tmp_path):
    process, url = start_embedded({**node_env, "IMMUTANT_HTTP_MAX_BODY": "2048"}, tmp_path)
    try:
        wait_until(lambda: requests.get(f"{url}/who", timeout=5).status_code == 200, timeout=10)
        hits = backend.hits
        # A declared length over the limit is refused before anything is forwarded
        declared = exchange(port_of(url), b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n"
                                          b"Connection: close\r\n\r\n" + b"y" * 4096)
        assert status_of(declared) == 413, declared[:300]
        assert backend.hits == hits
        # A chunked body that grows over it is cut off with a 413 too
        chunks = b"".join(b"400\r\n" + b"z" * 1024 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
        streamed = exchange(port_of(url), b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                          b"Connection: close\r\n\r\n" + chunks)
        assert status_of(streamed) == 413, streamed[:300]
        # And a body within the limit goes through
        assert requests.post(f"{url}/echo", data=b"k" * 2000, timeout=10).json()["length"] == 2000
    finally:
        process.cleanup()


@pytest.mark.parametrize("opening", [b"", b"GET /who HTTP/1.1\r\nHost: x\r\n"])
def test_the_balancer_closes_a_connection_whose_request_head_never_completes(backend, node_env, tmp_path, opening):
    # Given the balancer holding clients to a 3 s idle timeout
    process, url = start_embedded({**node_env, "IMMUTANT_HTTP_IDLE_TIMEOUT": "3"}, tmp_path)
    try:
        # When a client sends nothing, or a request head one header byte a second
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as sock:
            sock.sendall(opening)
            closed = False
            for _ in range(30):  # up to 30 s: the balancer must hang up long before
                try:
                    if opening:
                        sock.sendall(b"X")
                    sock.settimeout(1)
                    closed = sock.recv(100) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                if closed:
                    break
            # Then it hangs up
            assert closed, "the balancer kept a connection whose request head never completed"
    finally:
        process.cleanup()


MALFORMED = [
    b"POST /who HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /who HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
    b"GET /who HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",  # obs-fold
    b"GET /who HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /who HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100_000 + b"\r\n\r\n",
    b"POST /who HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
]


def test_malformed_requests_are_a_400_and_one_log_line_never_a_traceback(backend, node_env, tmp_path):
    # Given the balancer and the console, each a real process
    balancer, url = start_embedded(node_env, tmp_path)
    console_port = free_port()
    console = NodeProcess(["immutant", "console", "--port", str(console_port)], node_env, cwd=tmp_path)
    try:
        console.wait_for("console for cluster", timeout=20)
        wait_until(lambda: requests.get(f"{url}/who", timeout=5).status_code == 200, timeout=10)
        hits = backend.hits
        # When clients send requests no HTTP parser may accept (smuggling attempts among them)
        for port in (port_of(url), console_port):
            for request in MALFORMED:
                # Then each is a 400, none reaches the node
                assert status_of(exchange(port, request)) == 400, (port, request[:80])
        assert backend.hits == hits
        # And neither process logs a traceback for them: a client's garbage is one line in the log
        for process in (balancer, console):
            wait_until(lambda process=process: process.output.count("malformed request from") >= len(MALFORMED),
                       timeout=10, message=process.output[-2000:])
            assert "Traceback" not in process.output, process.output[-3000:]
        assert requests.get(f"{url}/who", timeout=5).json()["node"] == "x"
    finally:
        balancer.cleanup()
        console.cleanup()
