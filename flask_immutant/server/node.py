"""The node supervisor: what ``flask immutant run`` is.

It owns the node's identity, its listening socket, its membership heartbeat and the app runtime
processes it starts; it restarts a crashed runtime with backoff and, on SIGINT/SIGTERM, stops
them within ``IMMUTANT_SHUTDOWN_TIMEOUT`` and leaves the cluster at once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import threading
import time
from typing import IO

import redis

from .. import portable
from ..cluster import Member, Membership, NodeIdentity
from ..cluster.identity import WILDCARD_HOSTS
from ..errors import NodeStartError
from ..extension import ImmutantState
from ..loops import Loop
from ..private import make_private_dir
from ..store import EmbeddedStore, client_from_url, describe_url, store_url
from .supervisor import READY_TIMEOUT, AppTarget, RuntimeProcess, Supervisor, Unit, stop_all
from .zygote import start_template, stop_template

__all__ = ["READY_TIMEOUT", "AppTarget", "IdleResponder", "Node", "RuntimeProcess"]

log = logging.getLogger("flask_immutant.node")

#: Seconds the idle responder keeps reading a connection it answered, waiting for the client to hang up.
IDLE_LINGER = 2.0
#: Connections the idle responder keeps draining at once (select() stops at descriptor 1024).
IDLE_MAX_LINGERING = 512


#: Seconds (at least the failure timeout) after a node starts before it unlinks the lock files of
#: holders already dead then: their leases have expired or been taken over by then, those of other
#: clusters of this machine with a failure timeout up to 2.5 min included (a proof's poll and grace).
LOCK_SWEEP_DELAY = 60.0
#: Seconds the dead-holder sweeper waits between steps when nothing wakes it (a crash does).
SWEEPER_IDLE = 3600.0


class IdleResponder:
    """Answers 503 on the node's HTTP socket while no app runtime serves it (a node waiting for
    deployments, or between an undeploy and the next deploy), so clients fail fast instead of
    waiting in the listen backlog of a socket nobody accepts on.

    One thread, never blocked by a client: each connection gets its answer at once, without
    waiting for the request, and is then only drained until the client hangs up or
    :data:`IDLE_LINGER` passes (closing with the request unread could reset the connection
    before the client reads the answer)."""

    def __init__(self, listener: socket.socket, node_name: str, stop: threading.Event) -> None:
        self.listener = listener
        self.served = threading.Event()  # set while a runtime serves the root context
        self._stop = stop
        body = f"no app is deployed at / on node {node_name}\n".encode()
        self._answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\n"
                        b"Connection: close\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self._lingering: dict[socket.socket, float] = {}
        self._loop = Loop("idle-http", self._step, 0.2, stop_event=stop)

    def start(self) -> None:
        self._loop.start()

    def _step(self) -> float:
        """Answer every waiting connection, drain the answered ones, expire the lingering."""
        if self.served.is_set():
            self._close_all()
            return 0.2
        try:
            readable, _, _ = select.select([self.listener, *self._lingering], [], [], 0.2)
        except (ValueError, OSError):
            self._close_all()  # the listener was closed (the node is stopping) or past select()'s limit
            return 0.2 if self.listener.fileno() < 0 else 0.0
        for sock in readable:
            if sock is self.listener:
                self._accept()
            else:
                self._drain(sock)
        self._expire()
        return 0.0

    def _accept(self) -> bool:
        if self.served.is_set():
            return True
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False  # the listener was closed
        conn.setblocking(False)
        try:
            conn.send(self._answer)  # a few hundred bytes into an empty send buffer: never blocks
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return True
        if len(self._lingering) >= IDLE_MAX_LINGERING:
            oldest = min(self._lingering, key=self._lingering.__getitem__)
            del self._lingering[oldest]
            oldest.close()
        self._lingering[conn] = time.monotonic() + IDLE_LINGER
        return True

    def _drain(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lingering.pop(sock, None)
            sock.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for sock in [s for s, until in self._lingering.items() if until <= now]:
            del self._lingering[sock]
            sock.close()

    def _close_all(self) -> None:
        for sock in list(self._lingering):
            sock.close()
        self._lingering.clear()


class Node:
    """One cluster node (the supervisor process)."""

    def __init__(self, state: ImmutantState, target: AppTarget | None, *, offset_given: bool = True) -> None:
        self.state = state
        self.settings = state.settings
        self.identity = NodeIdentity.from_settings(self.settings)
        if self.identity.host in WILDCARD_HOSTS and not self.settings["IMMUTANT_ADVERTISE_HOST"]:
            raise NodeStartError(
                f"IMMUTANT_HOST={self.identity.host} binds every interface, so other nodes and balancers "
                "cannot tell which address reaches this node: set IMMUTANT_ADVERTISE_HOST (--advertise-host)"
            )
        self.target = target
        self.offset_given = offset_given
        self.store: redis.Redis | None = None
        self.membership: Membership | None = None
        self.stop_requested = threading.Event()
        #: Starts, restarts and stops every runtime of this node, the deployer's too.
        self.supervisor = Supervisor(self.stop_requested, on_crash=self._runtime_crashed)
        #: The runtime of the app the node was started with (``--app``), once started.
        self.local: Unit | None = None
        self.stopped = threading.Event()
        #: Set when a runtime crashed, cleared when the sweeper starts a sweep for it.
        self._crashed = threading.Event()
        self._sweeper = Loop("dead-holder-sweep", self._sweep_dead_holders, SWEEPER_IDLE, wait_first=True,
                             stop_event=self.stop_requested)
        self._listener: socket.socket | None = None
        self._dir_lock: IO[str] | None = None
        self.idle_responder: IdleResponder | None = None

    # --- description ---

    def effective_url(self) -> str:
        return self.settings["IMMUTANT_REDIS_URL"] or EmbeddedStore(self.settings["IMMUTANT_HOME"]).url

    def banner(self) -> str:
        """The first line ``run`` prints: the effective configuration."""
        ident = self.identity
        ports = " ".join(f"{k}={v}" for k, v in ident.ports.items())
        embedded = "" if self.settings["IMMUTANT_REDIS_URL"] else " (embedded)"
        return (
            f"flask-immutant node {ident.name}: cluster={self.state.keys.cluster} "
            f"clustered={'yes' if ident.clustered else 'no'} host={ident.host}"
            f"{f' advertise={ident.address}' if ident.address != ident.host else ''} {ports} "
            f"offset={ident.port_offset} data={ident.data_dir} "
            f"store={describe_url(self.effective_url())}{embedded} "
            f"app={self.target.label if self.target else '(none: waiting for deployments)'}"
        )

    # --- lifecycle ---

    def start(self) -> None:
        start_template()  # first: its imports overlap with the node's start-up
        self._listener = self._bind()
        url = store_url(self.settings, start=True)
        self.store = client_from_url(url)
        self.state.__dict__["store"] = self.store  # share the one client with plugins
        self.state.pm.hook.immutant_node_starting(node=self)
        self.membership = Membership(
            self.store, self.state.keys, self.identity, self.settings["IMMUTANT_FAILURE_TIMEOUT"],
            on_joined=self._joined, on_left=self._left, on_lost=self._lost, on_store_error=self._store_error,
        )
        self.membership.join()  # the name is the cluster's fact, checked before the local data dir
        try:
            self._lock_data_dir()
        except NodeStartError:
            self.membership.leave()
            self.membership = None
            raise
        self._sweeper.start()  # before any runtime: idle until one crashes
        if self.target is not None:
            self.local = self.start_local(self.target)
        else:
            self.idle_responder = IdleResponder(self.listener, self.identity.name, self.stopped)
            self.idle_responder.start()
        self.state.pm.hook.immutant_node_started(node=self)
        portable.sweep_abandoned_locks(max(self.settings["IMMUTANT_FAILURE_TIMEOUT"], LOCK_SWEEP_DELAY))

    @property
    def listener(self) -> socket.socket:
        """The node's HTTP socket, shared by the runtimes serving the root context."""
        assert self._listener is not None, "the node has not started"
        return self._listener

    def runtime_environ(self) -> dict[str, str]:
        """Environment for an app runtime: the node's settings it inherits, its name and its store."""
        return {**self.settings.runtime_environ(), "IMMUTANT_NODE_NAME": self.identity.name,
                "IMMUTANT_REDIS_URL": self.effective_url()}

    def bind_extra(self) -> socket.socket:
        """A listening socket on a free port of the node's host, for an app at another context."""
        family = socket.AF_INET6 if ":" in self.identity.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((self.identity.host, 0))
        sock.listen(1024)
        sock.set_inheritable(True)
        return sock

    def start_local(self, target: AppTarget) -> Unit:
        """The app the node was started with: a local deployment on the node's socket, with the
        node's environment (no deployment record, so no ``_IMMUTANT_DEPLOYMENT``)."""
        unit = self.supervisor.start(target.label, target, self.listener, self.runtime_environ())
        if unit.runtime.ready:
            log.info("app %s serves on http://%s:%d", target.label, self.identity.address, self.identity.http_port)
        return unit

    def run(self) -> None:
        """Supervise until stopped: the local app's runtime is restarted with backoff (the
        deployer's runtimes are checked by the deployer, through the same supervisor)."""
        while not self.stop_requested.wait(0.2):
            if self.local is not None:
                self.supervisor.check(self.local)

    def stop(self) -> None:
        """Graceful stop: runtimes first (bounded), then leave the cluster at once."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.stop_requested.set()  # cuts short any wait for a runtime to become ready
        timeout = self.settings["IMMUTANT_SHUTDOWN_TIMEOUT"]
        # Plugins hear of the stop before any runtime stops (the deployer stops its runtimes there,
        # in parallel); then the node's own runtime stops.
        self.state.pm.hook.immutant_node_stopping(node=self)
        if self.idle_responder is not None:
            self.idle_responder.served.set()
        if self.local is not None:
            stop_all([self.local.runtime], timeout)
        stop_template()  # after the runtimes: they die with it
        self._sweeper.stop(timeout=1.0)  # its wait for a grace ends with the stop request
        if self.membership is not None:
            self.membership.leave()
        if self._listener is not None:
            self._listener.close()

    def _runtime_crashed(self) -> None:
        """A runtime died without releasing its leases: have the sweeper release every lease whose
        holder is provably dead, so contenders on other hosts, which cannot prove it, take over at
        once, not at the TTL. Crashes during a sweep make one more."""
        self._crashed.set()
        self._sweeper.wake()

    def _sweep_dead_holders(self) -> None:
        """The sweeper's step (a :class:`Loop`: one sweep at a time, errors logged, stops with the
        node): ``release_dead_holders``, which waits each holder's grace, after a crash only."""
        if not self._crashed.is_set() or self.store is None:
            return
        self._crashed.clear()
        from ..cluster.lease import release_dead_holders

        released = release_dead_holders(self.store, self.state.keys, self.stop_requested)
        if released:
            log.info("released the leases of a crashed runtime: %s", ", ".join(sorted(released)))

    # --- membership callbacks ---

    def _joined(self, member: Member) -> None:
        if member.name != self.identity.name:
            log.info("member joined: %s (%s:%s)", member.name, member.address, member.ports.get("http"))
        self.state.pm.hook.immutant_member_joined(node=self, member=member)

    def _left(self, member: Member, reason: str) -> None:
        log.info("member left: %s (%s)", member.name, reason)
        self.state.pm.hook.immutant_member_left(node=self, member=member, reason=reason)

    def _lost(self, reason: str) -> None:
        log.error("%s; stopping this node", reason)
        self.stop_requested.set()

    def _store_error(self, exc: Exception) -> None:
        """The embedded store is this machine's to keep up: restart it if it died (AOF restores it)."""
        if self.settings["IMMUTANT_REDIS_URL"]:
            return
        embedded = EmbeddedStore(self.settings["IMMUTANT_HOME"])
        if not embedded.is_running():
            log.warning("the embedded store is down (%s); starting it again", exc)
            embedded.ensure_running()

    # --- resources ---

    def _lock_data_dir(self) -> None:
        data_dir = self.identity.data_dir
        make_private_dir(data_dir)  # and IMMUTANT_HOME above it, when we create it
        handle = open(data_dir / "node.lock", "a+")  # noqa: SIM115 - held for the node's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise NodeStartError(
                f"data dir {data_dir} is in use by another node on this machine; "
                "choose another --node-name or --port-offset"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._dir_lock = handle

    def _bind(self) -> socket.socket:
        host, port = self.identity.host, self.identity.http_port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise NodeStartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            hint = (" start this node with --port-offset 100" if not self.offset_given
                    else " choose another --port-offset")
            raise NodeStartError(f"port {port} on {host} is already in use (another node?);{hint}") from None
        sock.listen(1024)
        sock.set_inheritable(True)
        return sock
