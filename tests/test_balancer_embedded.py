"""The embedded balancer (`flask immutant balancer`) as a real process, in front of stand-in
backends whose contexts the test publishes: routing, route cookies, retries, errors, streaming."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from balancer_support import Backend, free_port, start_embedded

from flask_immutant.contexts import registry
from flask_immutant.keys import Keys

from support import wait_until


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    started = {name: Backend(name) for name in ("x", "y")}
    try:
        yield started
    finally:
        for backend in started.values():
            backend.close()


@pytest.fixture
def publish(store_client, cluster_name):
    keys = Keys(cluster_name)

    def publish(node: str, port: int, path: str = "/") -> None:
        registry.publish(store_client, keys, registry.Context(node, path, "app", "127.0.0.1", port, 100, os.getpid(),
                                                              time.time()), 60)
        registry.announce(store_client, keys, f"{node}|{path}")

    return publish


@pytest.fixture
def balancer(node_env, tmp_path: Path):
    process, url = start_embedded(node_env, tmp_path, "-v")
    try:
        yield url
    finally:
        process.cleanup()


def served_by(url: str, cookies: dict[str, str] | None = None, method: str = "GET", **kw: object) -> str:
    response = requests.request(method, url, cookies=cookies, timeout=10, **kw)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    return str(response.json()["node"])


def nodes_seen(url: str, tries: int) -> set[str]:
    responses = [requests.get(url, timeout=5) for _ in range(tries)]
    return {r.json()["node"] for r in responses if r.status_code == 200}


def test_requests_go_to_the_longest_matching_context(backends, publish, balancer):
    # Given x serving / and y serving /shop
    publish("x", backends["x"].port, "/")
    publish("y", backends["y"].port, "/shop")
    # (x alone already answers /shop/a: wait until the balancer has seen y's context too; CI once
    # asked between the two)
    wait_until(lambda: (r := requests.get(f"{balancer}/shop/a", timeout=5)).status_code == 200
               and r.json()["node"] == "y", timeout=5)
    # Then each path goes to the right one, and the path is forwarded unchanged
    assert served_by(f"{balancer}/shop/a?q=1") == "y"
    assert requests.get(f"{balancer}/shop/a?q=1", timeout=5).json()["path"] == "/shop/a?q=1"
    assert served_by(f"{balancer}/shop") == "y"
    assert served_by(f"{balancer}/shopping") == "x"
    assert served_by(f"{balancer}/") == "x"


def test_the_route_cookie_is_set_once_and_binds_the_session(backends, publish, balancer):
    publish("x", backends["x"].port)
    publish("y", backends["y"].port)
    wait_until(lambda: len(nodes_seen(f"{balancer}/who", 10)) == 2, timeout=5)
    # Given a client with no route cookie
    session = requests.Session()
    first = session.get(f"{balancer}/who", timeout=5)
    node = first.json()["node"]
    # Then the balancer binds it to the node that served it, beside the app's own cookie
    assert session.cookies.get("IMMUTANT_ROUTE") == node
    assert session.cookies.get("app") == "1"
    assert "httponly" in first.headers["Set-Cookie"].lower()
    # And every later request goes there without the cookie being set again
    for _ in range(10):
        response = session.get(f"{balancer}/who", timeout=5)
        assert response.json()["node"] == node
        assert "IMMUTANT_ROUTE" not in response.headers.get("Set-Cookie", "")
    # And the backend sees the client's cookies
    assert "IMMUTANT_ROUTE" in response.json()["cookie"]


def test_an_idempotent_request_is_retried_on_another_node_when_connecting_fails(backends, publish, balancer):
    # Given a context whose node refuses connections, bound to a client by its route cookie
    dead = free_port()
    publish("dead", dead)
    publish("x", backends["x"].port)
    wait_until(lambda: requests.get(f"{balancer}/", cookies={"IMMUTANT_ROUTE": "x"}, timeout=5).status_code == 200,
               timeout=5)
    # When it sends a POST: nothing reached the dead node, so another node gets it (as HAProxy does)
    response = requests.post(f"{balancer}/echo", cookies={"IMMUTANT_ROUTE": "dead"}, data=b"123", timeout=5)
    assert response.status_code == 200, response.text
    # When it sends idempotent requests
    for method in ("GET", "PUT", "DELETE", "GET"):
        response = requests.request(method, f"{balancer}/who", cookies={"IMMUTANT_ROUTE": "dead"}, timeout=5,
                                    data=b"" if method == "PUT" else None)
        # Then another node answers, and the session is bound to it
        assert response.status_code == 200, response.text
        assert response.json()["node"] == "x"
        assert response.cookies.get("IMMUTANT_ROUTE") == "x"


def test_nothing_to_serve_is_a_clear_503(backends, publish, balancer, store_client, cluster_name):
    response = requests.get(f"{balancer}/nowhere", timeout=5)
    assert response.status_code == 503 and "no app is deployed" in response.text
    publish("x", backends["x"].port)
    wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 200, timeout=5)
    registry.set_control(store_client, Keys(cluster_name), "STOPPED", node="x")
    wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 503, timeout=5)
    response = requests.get(f"{balancer}/", timeout=5)
    assert "x STOPPED" in response.text and response.headers["Retry-After"] == "1"


def test_large_bodies_stream_both_ways(backends, publish, balancer):
    publish("x", backends["x"].port)
    wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 200, timeout=5)
    # An upload of 48 MiB, sent chunked with no length and with one
    payload = os.urandom(1024 * 1024) * 48
    digest = hashlib.sha256(payload).hexdigest()
    response = requests.post(f"{balancer}/echo", data=payload, timeout=60)
    assert response.json() == {"node": "x", "sha256": digest, "length": len(payload)}
    # A download of 96 MiB, read in pieces
    size = 96 * 1024 * 1024
    with requests.get(f"{balancer}/bytes?n={size}", stream=True, timeout=60) as response:
        assert int(response.headers["Content-Length"]) == size
        assert sum(len(chunk) for chunk in response.iter_content(1 << 20)) == size


def test_a_slow_client_holds_up_nobody(backends, publish, balancer):
    publish("x", backends["x"].port)
    wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 200, timeout=5)
    # Given a client that asks for a large body and then stops reading
    host, port = balancer.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    try:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.sendall(f"GET /bytes?n={256 * 1024 * 1024} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert slow.recv(1024).startswith(b"HTTP/1.1 200")
        # Then other clients are served meanwhile, and the balancer did not buffer the body
        for _ in range(20):
            assert served_by(f"{balancer}/who") == "x"
    finally:
        slow.close()


def test_the_console_is_mounted_when_it_exists(backends, publish, balancer):
    publish("x", backends["x"].port)
    wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 200, timeout=5)
    response = requests.get(f"{balancer}/_immutant/", timeout=5, allow_redirects=False)
    try:
        import flask_immutant.balancer.console  # noqa: F401
    except ImportError:
        assert response.json()["node"] == "x"  # no console: proxied like any path
        return
    assert backends["x"].hits == 1  # only the readiness request reached the backend
    assert response.status_code < 500


class RawNode:
    """A node written on raw sockets, to answer in ways http.server does not: chunked bodies,
    bodies ended by closing, and kept-alive connections it closes when the next request comes.
    It counts the connections it accepted and records every request head it read."""

    def __init__(self, close_second: bool = False) -> None:
        self.close_second = close_second
        self.connections = 0
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        buffered = b""
        answered = 0
        with connection:
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                if self.close_second and answered:
                    return  # a kept-alive connection closed just as a request came (an idle timeout's race)
                self.heads.append(head)
                target = head.split(b" ")[1]
                if target == b"/chunked":
                    connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Node: raw\r\n\r\n"
                                       b"5;ext=1\r\nhello\r\n")
                    connection.sendall(b"1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
                elif target == b"/until-close":
                    connection.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil ")
                    connection.sendall(b"closed")
                    return
                else:
                    body = b'{"node": "raw"}'
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                answered += 1

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def raw_node() -> Iterator[RawNode]:
    node = RawNode()
    try:
        yield node
    finally:
        node.close()


def test_answers_are_relayed_whole_over_kept_alive_connections(raw_node, publish, balancer):
    # Given a node that chunks one answer and ends another by closing the connection
    publish("raw", raw_node.port)
    wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 200, timeout=5)
    # When a client asks for the chunked one several times, one request after another
    for _ in range(5):
        response = requests.get(f"{balancer}/chunked", timeout=5)
        # Then each arrives whole, de-chunked and chunked again, with the node's headers
        assert response.status_code == 200 and response.content == b"hello world"
        assert response.headers["X-Node"] == "raw"
    # And the balancer sent them all on the connection it had kept alive from the first request
    assert raw_node.connections == 1
    # And an answer the node ends by closing arrives whole, and the next request opens a new connection
    assert requests.get(f"{balancer}/until-close", timeout=5).content == b"until closed"
    assert requests.get(f"{balancer}/", timeout=5).json() == {"node": "raw"}
    assert raw_node.connections == 2
    # And HEAD gets the head only
    assert requests.head(f"{balancer}/", timeout=5).status_code == 200
    # And the node saw the client's headers, less hop-by-hop ones, with the balancer's X-Forwarded-* last
    response = requests.get(f"{balancer}/", headers={"X-Custom": "a", "Connection": "keep-alive, X-Custom",
                                                     "X-Forwarded-For": "10.0.0.1"}, timeout=5)
    assert response.status_code == 200
    lines = raw_node.heads[-1].split(b"\r\n")
    assert lines[0] == b"GET / HTTP/1.1"
    names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    assert b"connection" not in names and b"x-custom" in names
    assert names[-3:] == [b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"]
    assert b"X-Forwarded-For: 10.0.0.1, 127.0.0.1" in lines


def test_a_kept_alive_connection_the_node_closed_is_retried_only_for_idempotent_requests(publish, balancer):
    # Given a node that closes a kept-alive connection when the next request comes on it
    node = RawNode(close_second=True)
    try:
        publish("raw", node.port)
        wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 200, timeout=5)
        # When a GET comes on that connection: it is sent again, on a new one
        for _ in range(3):
            assert requests.get(f"{balancer}/", timeout=5).json() == {"node": "raw"}
        # When a POST comes on it: the node may have started on it, so it is not sent again (the
        # close shows while the body is sent, or while the answer is read: either is a 502)
        response = requests.post(f"{balancer}/", data=b"once", timeout=5)
        assert response.status_code == 502
        assert re.search(r"closed the connection|connection closed while the request was sent", response.text), \
            response.text
    finally:
        node.close()


_ANSWER = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{"node": "raw"}'
_STRAY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 19\r\n\r\n{\"node\": \"smuggled\"}"

#: Answers a hostile or broken node gives, by path: (the bytes sent as they are, in order, with a
#: pause between them; the status the client must get; whether the connection may be reused after).
HOSTILE: dict[bytes, tuple[list[bytes], int, bool]] = {
    b"/length-and-chunked": ([b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n0\r\n\r\n"], 502, False),
    b"/two-lengths": ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello, "], 502, False),
    b"/same-length-twice": ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"], 502, False),
    b"/negative-length": ([b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello"], 502, False),
    b"/huge-length": ([b"HTTP/1.1 200 OK\r\nContent-Length: 184467440737095516160\r\n\r\nhello"], 502, False),
    b"/chunk-size-overflow": ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"10000000000000005\r\nhello\r\n0\r\n\r\n"], 502, False),
    b"/bad-chunk-size": ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5x\r\nhello\r\n0\r\n\r\n"], 502, False),
    b"/chunk-without-crlf": ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhelloXX0\r\n\r\n"], 502, False),
    b"/cr-in-name": ([b"HTTP/1.1 200 OK\r\nX-A\rB: 1\r\nContent-Length: 2\r\n\r\nhi"], 502, False),
    b"/cr-in-value": ([b"HTTP/1.1 200 OK\r\nX-A: 1\r2\r\nContent-Length: 2\r\n\r\nhi"], 502, False),
    b"/lf-in-value": ([b"HTTP/1.1 200 OK\r\nX-A: 1\n2: 3\r\nContent-Length: 2\r\n\r\nhi"], 502, False),
    b"/nul-in-value": ([b"HTTP/1.1 200 OK\r\nX-A: 1\x002\r\nContent-Length: 2\r\n\r\nhi"], 502, False),
    b"/obs-fold": ([b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 2\r\n\r\nhi"], 502, False),
    b"/space-before-colon": ([b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi"], 502, False),
    b"/http-2-status-line": ([b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"], 502, False),
    b"/head-over-the-cap": ([b"HTTP/1.1 200 OK\r\n" + b"X-Big: %s\r\n" % (b"b" * 1000) * 132
                             + b"Content-Length: 2\r\n\r\nhi"], 502, False),
    b"/head-dribbled-over-the-cap": ([b"HTTP/1.1 200 OK\r\n"] + [b"X-Big: %s\r\n" % (b"b" * 16000)] * 9, 502, False),
    b"/head-under-the-cap": ([b"HTTP/1.1 200 OK\r\n" + b"X-Big: %s\r\n" % (b"b" * 2000) * 60
                              + b"Content-Length: 2\r\n\r\nhi"], 200, True),
    b"/interim-first": ([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                         + _ANSWER], 200, True),
    b"/bytes-after-the-body": ([_ANSWER + _STRAY], 200, False),
    b"/bytes-after-the-body-later": ([_ANSWER, _STRAY], 200, False),
    b"/body-after-204": ([b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"], 204, False),
}


class HostileNode:
    """A raw-socket node answering each path in :data:`HOSTILE` as written there (anything else:
    a well-formed JSON answer), on kept-alive connections. It logs (connection number, path)."""

    def __init__(self) -> None:
        self.log: list[tuple[int, bytes]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        number = 0
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            number += 1
            threading.Thread(target=self._serve, args=(connection, number), daemon=True).start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        buffered = b""
        with connection:
            while True:
                while b"\r\n\r\n" not in buffered:
                    try:
                        data = connection.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                target = head.split(b" ")[1]
                self.log.append((number, target))
                pieces = HOSTILE[target][0] if target in HOSTILE else [_ANSWER]
                try:
                    for index, piece in enumerate(pieces):
                        if index:
                            time.sleep(0.2)  # a separate read on the balancer's side
                        connection.sendall(piece)
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()


def test_a_hostile_node_gets_a_clean_502_and_its_connection_is_never_reused(publish, balancer):
    # Given a node that answers in every way a parser can be led astray, between well-formed answers
    node = HostileNode()
    try:
        publish("raw", node.port)
        wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 200, timeout=5)
        for target, (_, status, reusable) in HOSTILE.items():
            # When a client asks for it (on a kept-alive connection to the node)
            assert requests.get(f"{balancer}/", timeout=10).json() == {"node": "raw"}
            response = requests.get(f"{balancer}{target.decode()}", timeout=10)
            # Then the client gets a clean answer: a 502 for what cannot be relayed, else the node's
            assert response.status_code == status, (target, response.status_code, response.text)
            if status == 502:
                assert "node raw" in response.text, (target, response.text)
            elif status == 200:
                assert response.content in (b"hi", b'{"node": "raw"}'), (target, response.content)
            hostile = node.log[-1]
            assert hostile[1] == target
            if target.endswith(b"-later"):
                time.sleep(0.6)  # the stray answer arrives while the connection is idle in the pool
            # And the balancer goes on serving, never with what the node sent beyond its answer
            assert requests.get(f"{balancer}/", timeout=10).json() == {"node": "raw"}, target
            # And the connection that carried a broken answer is not reused
            if not reusable:
                assert node.log[-1][0] != hostile[0], target
    finally:
        node.close()


def test_a_body_broken_after_the_head_was_relayed_cuts_the_client_connection(publish, balancer):
    # Given a node whose chunked answer turns malformed after its head went to the client
    node = HostileNode()
    HOSTILE[b"/chunked-then-broken"] = ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                                         b"zz\r\nworld\r\n0\r\n\r\n"], 200, False)
    try:
        publish("raw", node.port)
        wait_until(lambda: requests.get(f"{balancer}/", timeout=5).status_code == 200, timeout=5)
        # When a client asks for it: the status line is gone, so its connection is cut, not ended cleanly
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            requests.get(f"{balancer}/chunked-then-broken", timeout=10).content  # noqa: B018
        hostile = node.log[-1]
        # And the balancer goes on serving, on another connection to the node
        assert requests.get(f"{balancer}/", timeout=10).json() == {"node": "raw"}
        assert node.log[-1][0] != hostile[0]
    finally:
        del HOSTILE[b"/chunked-then-broken"]
        node.close()
