"""A cluster of separate hosts on one machine, for tests and bench/chaos.py.

Each host is a Linux network namespace with its own IP on a bridge, its own IMMUTANT_HOME and
data folder (no shared disk: apps are deployed by archive). The store is the recommended HA
deployment of docs/guarantees.md: a Redis primary, two replicas and three Sentinels, each on a
host of its own, so a partition can cut any of them off. Partitions are made on the bridge: a
host's link goes down (cut off from everything), or a group of hosts moves to a second bridge
(an island that still sees itself). Needs root and iproute2; every name carries a run id, so
parallel runs do not collide, and everything is removed in ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from flask_immutant.keys import Keys
from flask_immutant.store import client_from_url

from support import NodeProcess, run_flask, wait_until

#: The Sentinel service name of the store.
SERVICE = "imt"
#: Sentinel: seconds of silence before the primary is taken for down (1 s, as the tests want speed).
DOWN_AFTER_MS = 1000
#: The recommended settings of every Redis server (docs/guarantees.md): a primary cut off from
#: its replicas refuses writes after a few seconds, and a promoted replica still has one replica.
RECOMMENDED_REDIS = ("--appendonly", "yes", "--appendfsync", "everysec",
                     "--min-replicas-to-write", "1", "--min-replicas-max-lag", "2")
#: The lease setting that goes with it: one replica confirms every acquisition and renewal.
RECOMMENDED_LEASE_REPLICAS = 1
SECRET = "multihost-tests-cluster-secret-0123456789"
DAEMON = "counter"
QUEUE = "/queue/mh"

#: The app every host runs: a fenced singleton daemon that records each effect with its fencing
#: token in the host's own audit folder, and a listener that records each message it handles.
APP = '''
import os, time
from pathlib import Path
from flask import Flask, session
from flask_immutant import ImmutantExtension, daemons, get_state, messaging

app = Flask(__name__)
app.config.update(IMMUTANT_CLUSTERED=True, IMMUTANT_SESSIONS=True, SECRET_KEY="multihost")
ImmutantExtension(app)
AUDIT = Path(os.environ["MH_AUDIT"])
QUEUE = "/queue/mh"
messaging.start(QUEUE, app=app)


def _append(name, line):
    with open(AUDIT / name, "a") as out:
        out.write(line + "\\n")


@messaging.listen(QUEUE, app=app)
def received(n):
    _append("received.log", str(n))


def counter():
    ctx = daemons.current()
    with open(AUDIT / "fenced.log", "a") as out:
        while not ctx.wait(0.02):
            out.write(f"{ctx.fence} {time.time():.6f}\\n")
            out.flush()


def stop_counter():
    _append("stopped.log", f"{time.time():.6f}")


daemons.start("counter", counter, stop_counter, app=app)


@app.get("/")
def index():
    session["visits"] = session.get("visits", 0) + 1
    return {"node": get_state().node_name, "visits": session["visits"]}
'''


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or ``None`` if they can."""
    if not shutil.which("ip"):
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"improbe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _free_subnet() -> str:
    """A 10.x.y/24 prefix no interface of this machine uses."""
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for _ in range(100):
        prefix = f"10.{random.randint(200, 254)}.{random.randint(0, 255)}"
        if f" {prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 subnet")


@dataclass
class Host:
    name: str
    namespace: str
    ip: str
    veth: str
    folder: Path
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    @property
    def audit(self) -> Path:
        return self.folder / "audit"

    def popen(self, argv: list[str], log: str) -> subprocess.Popen[Any]:
        """Run ``argv`` inside this host, output to ``folder/log``."""
        with open(self.folder / log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.namespace, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(proc)
        return proc


class Network:
    """Hosts on a bridge in the root namespace (which gets the ``.1`` address, so the test
    process reaches every host), and a second, address-less bridge for islands."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.run_id = uuid.uuid4().hex[:5]
        self.prefix = _free_subnet()
        self.bridge = f"imb{self.run_id}"
        self.island_bridge = f"imi{self.run_id}"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        try:
            for bridge in (self.bridge, self.island_bridge):
                ip("link", "add", bridge, "type", "bridge")
                self._made.append(bridge)
                ip("link", "set", bridge, "up")
            ip("addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
        except BaseException:
            self.close()
            raise

    def add(self, name: str) -> Host:
        index = len(self.hosts) + 2
        host = Host(name, f"imt-{self.run_id}-{name}", f"{self.prefix}.{index}", f"imv{self.run_id}{index:02d}",
                    self.folder / "hosts" / name)
        (host.audit).mkdir(parents=True)
        self.hosts[name] = host  # before it exists, so close() removes it whatever fails next
        ip("netns", "add", host.namespace)
        peer = f"imp{self.run_id}{index:02d}"
        ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
        self._made.append(host.veth)
        ip("link", "set", peer, "netns", host.namespace)
        ip("-n", host.namespace, "link", "set", peer, "name", "eth0")
        ip("-n", host.namespace, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        ip("-n", host.namespace, "link", "set", "lo", "up")
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        return host

    def cut(self, *hosts: Host) -> None:
        """Cut each of ``hosts`` off from everything (its link goes down)."""
        for host in hosts:
            ip("link", "set", host.veth, "down")

    def island(self, *hosts: Host) -> None:
        """Move ``hosts`` to a bridge of their own: they see each other, and nothing else."""
        for host in hosts:
            ip("link", "set", host.veth, "master", self.island_bridge)

    def heal(self, *hosts: Host) -> None:
        for host in hosts:
            ip("link", "set", host.veth, "master", self.bridge)
            ip("link", "set", host.veth, "up")

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.processes:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            pids = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True,
                                  check=False).stdout.split()
            for pid in pids:  # anything still running in our namespace was started by us
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            for proc in host.processes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, check=False)
        for link in reversed(self._made):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


class SentinelStore:
    """Redis primary ``r1``, replicas ``r2`` and ``r3``, Sentinels ``s1``-``s3``, one host each."""

    def __init__(self, network: Network, redis_args: Iterable[str] = RECOMMENDED_REDIS) -> None:
        self.network = network
        self.redis_args = list(redis_args)
        self.servers = {name: network.add(name) for name in ("r1", "r2", "r3")}
        self.sentinels = {name: network.add(name) for name in ("s1", "s2", "s3")}
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.ip}:26379" for s in self.sentinels.values())
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        first = self.servers["r1"]
        for name, host in self.servers.items():
            self.start_server(name, replica_of=None if host is first else first)
        for name, host in self.sentinels.items():
            config = host.folder / "sentinel.conf"
            config.write_text(
                f"port 26379\nbind {host.ip}\nprotected-mode no\ndir {host.folder}\n"
                f"sentinel monitor {SERVICE} {first.ip} 6379 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 2\n")
            self.procs[name] = host.popen([redis_server(), str(config), "--sentinel"], "sentinel.log")
        wait_until(lambda: self.replicas_of(first) == 2, timeout=20, message="two replicas attached and acknowledging")
        wait_until(lambda: self.primary() == first, timeout=20, message="Sentinels agree on the primary")

    def wait_ready(self) -> None:
        wait_until(self.sentinels_ready, timeout=60, message="every Sentinel knows both replicas and the others")

    def sentinels_ready(self) -> bool:
        """Every Sentinel is connected to both replicas and knows the other Sentinels: only then
        can any of them lead a failover that also moves the other replica to the new primary."""
        for sentinel in self.sentinels.values():
            client = redis.Redis(host=sentinel.ip, port=26379, socket_timeout=1, socket_connect_timeout=1)
            try:
                replicas = client.execute_command("SENTINEL", "replicas", SERVICE)
                others = client.execute_command("SENTINEL", "sentinels", SERVICE)
            except redis.RedisError:
                return False
            finally:
                client.close()
            healthy = [r for r in replicas if _flags(r) == {"slave"}]
            if len(healthy) != 2 or len(others) != 2:
                return False
        return True

    def start_server(self, name: str, replica_of: Host | None) -> None:
        host = self.servers[name]
        extra = ["--replicaof", replica_of.ip, "6379"] if replica_of else []
        self.procs[name] = host.popen(
            [redis_server(), "--bind", host.ip, "--port", "6379", "--protected-mode", "no", "--save", "",
             "--dir", str(host.folder), *self.redis_args, *extra], "redis.log")

    def kill(self, name: str) -> None:
        """SIGKILL one server (an outage, not a goodbye)."""
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(5)

    def client(self, host: Host) -> redis.Redis:
        return redis.Redis(host=host.ip, port=6379, socket_timeout=1, socket_connect_timeout=1)

    def replicas_of(self, host: Host) -> int:
        client = self.client(host)
        try:
            info = client.info("replication")
        except redis.RedisError:
            return 0
        finally:
            client.close()
        # Replicas done with their first sync (Valkey and Redis 7 delay a diskless one by 5 s, and
        # count the replica as connected meanwhile), and fresh enough for min-replicas-to-write.
        online = sum(1 for key, value in info.items()
                     if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")
        return min(online, int(info.get("min_slaves_good_slaves", online)))

    def primary(self) -> Host | None:
        """The primary the Sentinels reachable from here agree on (``None``: none yet)."""
        answers = set()
        for sentinel in self.sentinels.values():
            client = redis.Redis(host=sentinel.ip, port=26379, socket_timeout=1, socket_connect_timeout=1)
            try:
                address = client.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
                answers.add(address[0].decode() if address else None)
            except redis.RedisError:
                continue
            finally:
                client.close()
        if len(answers) != 1:
            return None
        address = answers.pop()
        return next((h for h in self.servers.values() if h.ip == address), None)


def _flags(reply: Any) -> set[str]:
    """The ``flags`` of one ``SENTINEL replicas`` entry (redis-py parses it into a dict)."""
    raw = (reply.get(b"flags") or reply.get("flags") or "") if isinstance(reply, dict) else ""
    return set((raw.decode() if isinstance(raw, bytes) else str(raw)).split(","))


def redis_server() -> str:
    """The system's redis-server (Sentinel included), else the one the embedded store ships."""
    from flask_immutant.store.embedded import redis_server_binary

    return shutil.which("redis-server") or redis_server_binary()


class Cluster:
    """Node hosts ``a``, ``b``, ``c`` on the Sentinel store, running the fenced test app."""

    def __init__(self, network: Network, nodes: int = 3, failure_timeout: float = 2.0,
                 lease_replicas: int = RECOMMENDED_LEASE_REPLICAS, redis_args: Iterable[str] = RECOMMENDED_REDIS,
                 node_args: Callable[[Host], Sequence[str]] | None = None) -> None:
        self.node_args = node_args
        self.folder = folder = network.folder
        self.network = network
        self.store = SentinelStore(self.network, redis_args)
        self.hosts = {name: self.network.add(name) for name in "abc"[:nodes]}
        self.nodes: dict[str, NodeProcess] = {}
        self.keys = Keys(f"mh{self.network.run_id}")
        self.failure_timeout = failure_timeout
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
        self.env.update(IMMUTANT_REDIS_URL=self.store.url, IMMUTANT_CLUSTER=self.keys.cluster,
                        IMMUTANT_SECRET=SECRET, IMMUTANT_FAILURE_TIMEOUT=str(failure_timeout),
                        IMMUTANT_LEASE_REPLICAS=str(lease_replicas), IMMUTANT_HTTP_PORT="8080",
                        PYTHONUNBUFFERED="1")
        self.app_folder = folder / "app" / "mh_app"
        self.app_folder.mkdir(parents=True)
        (self.app_folder / "mh_app.py").write_text(APP)
        self._client: redis.Redis | None = None

    # --- life cycle ---

    def start(self) -> None:
        self.store.start()
        for name in self.hosts:
            self.start_node(name)
        self.store.wait_ready()
        for name in self.hosts:
            self.nodes[name].wait_for(r"node \S+ joined cluster", timeout=60)

    def start_node(self, name: str, *args: str) -> NodeProcess:
        host = self.hosts[name]
        args = (*(self.node_args(host) if self.node_args else ()), *args)
        home = host.folder / "home"
        env = {**self.env, "IMMUTANT_HOME": str(home), "MH_AUDIT": str(host.audit)}
        if not any(a.startswith("--host") for a in args):
            args = ("--host", host.ip, *args)
        node = NodeProcess(["immutant", "run", "--clustered", "--node-name", name, *args], env, cwd=host.folder,
                           prefix=["ip", "netns", "exec", host.namespace])
        self.nodes[name] = node
        return node

    def deploy(self) -> None:
        env = {**self.env, "IMMUTANT_HOME": str(self.folder / "client"), "MH_AUDIT": str(self.folder)}
        done = run_flask(["--app", "mh_app", "immutant", "deploy", "--archive", "--wait", "60"], env,
                         cwd=self.app_folder, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    def close(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pid, signal.SIGKILL)
            node.cleanup()
        if self._client is not None:
            self._client.close()

    # --- what the test reads ---

    @property
    def client(self) -> redis.Redis:
        """A store client in the root namespace (which no partition cuts off)."""
        if self._client is None:
            self._client = client_from_url(self.store.url, socket_timeout=1, socket_connect_timeout=1)
        return self._client

    def holder(self) -> str | None:
        """The node holding the daemon's lease according to the store, if it answers."""
        try:
            raw = self.client.get(self.keys.lease(f"daemon:{DAEMON}"))
        except redis.RedisError:
            return None
        return str(json.loads(raw)["node"]) if raw else None

    def acquired(self, host: str) -> float:
        """When ``host``'s node acquired the daemon's lease it holds now (the lease's ``since``)."""
        raw = self.client.get(self.keys.lease(f"daemon:{DAEMON}"))
        lease = json.loads(raw) if raw else {}
        assert lease.get("node") == host, f"{host} does not hold the daemon's lease: {lease}"
        return float(lease["since"])

    def effects(self) -> list[tuple[int, float, str]]:
        """Every effect of the fenced daemon: (fencing token, time, host), in time order."""
        found = []
        for name, host in self.hosts.items():
            log = host.audit / "fenced.log"
            if log.exists():
                for line in log.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2:
                        found.append((int(parts[0]), float(parts[1]), name))
        return sorted(found, key=lambda e: e[1])

    def acting(self, since: float = 0.0) -> str | None:
        """The host whose daemon made the latest effect after ``since``, if any."""
        latest = [e for e in self.effects() if e[1] > since]
        return latest[-1][2] if latest else None

    def received(self) -> list[int]:
        numbers = []
        for host in self.hosts.values():
            log = host.audit / "received.log"
            if log.exists():
                numbers += [int(line) for line in log.read_text().split()]
        return numbers

    def stopped(self, name: str) -> list[float]:
        log = self.hosts[name].audit / "stopped.log"
        return [float(x) for x in log.read_text().split()] if log.exists() else []


@dataclass
class Tenure:
    fence: int
    host: str
    first: float
    last: float


def tenures(effects: list[tuple[int, float, str]]) -> list[Tenure]:
    """One tenure per fencing token: its host and the times of its first and last effect."""
    by_fence: dict[int, Tenure] = {}
    for fence, at, host in effects:
        tenure = by_fence.setdefault(fence, Tenure(fence, host, at, at))
        assert tenure.host == host, f"fencing token {fence} acted on {tenure.host} and on {host}"
        tenure.first, tenure.last = min(tenure.first, at), max(tenure.last, at)
    return sorted(by_fence.values(), key=lambda t: t.first)


#: Effects come every 20 ms; a longer silence ends a span of acting (the holder was stopped or frozen).
SPAN_GAP = 0.25


def spans(effects: list[tuple[int, float, str]]) -> list[tuple[float, float, int]]:
    """Intervals of continuous acting, (start, end, fencing token), in start order."""
    found: list[tuple[float, float, int]] = []
    open_spans: dict[int, list[float]] = {}
    for fence, at, _host in effects:
        span = open_spans.get(fence)
        if span is not None and at - span[1] <= SPAN_GAP:
            span[1] = at
            continue
        if span is not None:
            found.append((span[0], span[1], fence))
        open_spans[fence] = [at, at]
    found += [(start, end, fence) for fence, (start, end) in open_spans.items()]
    return sorted(found)


def overlap_seconds(effects: list[tuple[int, float, str]]) -> float:
    """Total time during which two fencing tokens both acted (0 when holders never overlap)."""
    total, reach, reach_fence = 0.0, float("-inf"), None
    for start, end, fence in spans(effects):
        if start < reach and fence != reach_fence:
            total += min(reach, end) - start
        if end > reach:
            reach, reach_fence = end, fence
    return total


def stale_effects(effects: list[tuple[int, float, str]]) -> int:
    """Effects made with a fencing token lower than one that already acted: what a receiver that
    checks tokens rejects (a holder frozen between its validity check and its write makes one)."""
    highest, stale = 0, 0
    for fence, _at, _host in effects:
        if fence < highest:
            stale += 1
        highest = max(highest, fence)
    return stale


class Publisher:
    """The test process publishing numbers to the queue, as any client of the cluster would,
    remembering which ones were acknowledged (publish returned)."""

    def __init__(self, env: dict[str, str]) -> None:
        import threading

        from flask_immutant import ImmutantState
        from flask_immutant.messaging.plugin import messaging_of

        self.state = ImmutantState.build({}, environ=env)
        self.messaging = messaging_of(self.state)
        self.acknowledged: list[tuple[int, float]] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._next = 0

    def start(self, interval: float = 0.02) -> Publisher:
        self.interval = interval
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            n, self._next = self._next, self._next + 1
            try:
                self.messaging.publish(QUEUE, n)
            except Exception:
                self.failed += 1
                continue
            self.acknowledged.append((n, time.time()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with contextlib.suppress(Exception):
            self.messaging.publisher.close()
        with contextlib.suppress(Exception):
            self.state.store.close()


@contextlib.contextmanager
def running_cluster(**options: Any) -> Iterator[Cluster]:
    folder = Path(tempfile.mkdtemp(prefix="imh-"))
    network = Network(folder)
    cluster: Cluster | None = None
    try:
        cluster = Cluster(network, **options)
        cluster.start()
        cluster.deploy()
        yield cluster
    except BaseException:
        for name, node in (cluster.nodes.items() if cluster else ()):
            print(f"--- node {name} ---\n" + "\n".join(node.lines[-60:]), file=sys.stderr)
        raise
    finally:
        if cluster is not None:
            cluster.close()
        network.close()
        shutil.rmtree(folder, ignore_errors=True)
