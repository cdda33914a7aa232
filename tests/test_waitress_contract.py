"""What a draining runtime reads of waitress's channels (``server/runtime.py``), pinned on a real
waitress server: these are not waitress's documented API, so an upgrade that moves them must fail
here rather than leave a redeploy closing connections under clients, or never closing them."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from waitress.server import create_server

from flask_immutant.server.http import with_read_deadline
from flask_immutant.server.runtime import _channels, _close_idle_channels

from support import wait_until


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


@pytest.fixture
def server() -> Iterator[Any]:
    from waitress.channel import HTTPChannel

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = create_server(hello, sockets=[listener], threads=1)
    server.channel_class = with_read_deadline(HTTPChannel, 30)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.trigger.pull_trigger(server.close)  # from the loop thread, whose map then empties
        thread.join(5)


def answer(sock: socket.socket) -> bytes:
    """One whole answer of ``hello`` (its head and body may come in separate reads)."""
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = sock.recv(1000)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def close_idle(server: Any, grace: float) -> None:
    done = threading.Event()
    server.trigger.pull_trigger(lambda: _close_idle_channels(server, grace, done))
    assert done.wait(5)


def test_contract_a_kept_alive_channel_is_found_idle_and_stamped_by_the_wall_clock(server: Any) -> None:
    # Given a client that made one request and keeps its connection
    client = http.client.HTTPConnection("127.0.0.1", server.socket.getsockname()[1], timeout=5)
    client.request("GET", "/")
    assert client.getresponse().read() == b"ok"
    (channel,) = wait_until(lambda: _channels(server), timeout=5)

    def idle() -> bool:  # the service thread ends the request just after the answer is sent
        with channel.requests_lock:
            return not channel.requests and channel.request is None and not channel.total_outbufs_len

    # Then the channel says it is idle, with the fields the drain reads
    wait_until(idle, timeout=5)
    # And its last activity is stamped with time.time(), which the grace is measured against
    assert abs(time.time() - channel.last_activity) < 5
    # When the drain closes idle channels with a grace longer than the pause, it keeps this one
    close_idle(server, grace=60)
    assert _channels(server) == [channel]
    # And with no grace left, it closes it
    close_idle(server, grace=0)
    wait_until(lambda: not _channels(server), timeout=5)
    client.close()


def test_contract_blank_lines_between_requests_leave_a_channel_idle(server: Any) -> None:
    """waitress stamps ``last_activity`` in ``handle_read`` before ``received`` sees the bytes;
    ``with_read_deadline`` puts the stamp back when they were only blank lines."""
    sock = socket.create_connection(("127.0.0.1", server.socket.getsockname()[1]), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer(sock).startswith(b"HTTP/1.1 200")
    (channel,) = wait_until(lambda: _channels(server), timeout=5)

    def settled() -> float | None:  # the answer is sent and stamped (the loop thread stamps last)
        before = channel.last_activity
        time.sleep(0.1)
        return before if not channel.requests and channel.last_activity == before else None

    stamped = wait_until(settled, timeout=5)
    # When the client sends only blank lines, its channel keeps its earlier stamp
    sock.sendall(b"\r\n\r\n")
    time.sleep(0.2)
    assert channel.last_activity == stamped and channel.request is None
    # And a real request is activity again, and is answered
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer(sock).startswith(b"HTTP/1.1 200")
    assert channel.last_activity > stamped
    sock.close()
