"""Fixtures: one real embedded store server per test session (per xdist worker), a fresh cluster
name per test, node subprocesses that are always cleaned up; and the tiers: every test gets its
markers (unit, nodes, rabbitmq, haproxy, prometheus, browser, multihost) from the rule in
``pytest_collection_modifyitems``, so new tests need no marker of their own."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from flask_immutant.portable import PORTABLE_ENV
from flask_immutant.store import EmbeddedStore

from support import TRACKED_APPS, HoldingProxy, NodeProcess, free_port_base, stop_embedded_store, unavailable

PLUGINS_DIR = Path(__file__).parent / "plugins"


@pytest.fixture(scope="session")
def immutant_home() -> Iterator[Path]:
    """A short private IMMUTANT_HOME (unix socket paths are limited to ~100 bytes)."""
    home = Path(tempfile.mkdtemp(prefix="imt-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_store(immutant_home: Path) -> Iterator[EmbeddedStore]:
    """The real embedded redis-server, started once for the session and killed in ``finally``."""
    store = EmbeddedStore(immutant_home)
    store.ensure_running()
    try:
        yield store
    finally:
        stop_embedded_store(store)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process apps read the process environment: keep the tester's IMMUTANT_* out of it, for
    every test, so an exported IMMUTANT_REDIS_URL never reaches a real store from a test."""
    for key in list(os.environ):
        if key.startswith("IMMUTANT_") and key != PORTABLE_ENV:  # that one is the tier's, not the app's
            monkeypatch.delenv(key)


@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test plugin modules in tests/plugins, importable by module name."""
    monkeypatch.syspath_prepend(str(PLUGINS_DIR))
    return PLUGINS_DIR


@pytest.fixture(autouse=True)
def close_tracked_stores() -> Iterator[None]:
    """Close the store clients of the apps a test made with ``support.track``."""
    yield
    while TRACKED_APPS:
        state = TRACKED_APPS.pop().extensions.get("immutant")
        sessions = state.features.get("sessions") if state is not None else None
        if sessions is not None:
            sessions.close()  # the near cache's tracking thread
        if state is not None and "store" in vars(state):
            state.store.close()


@pytest.fixture
def store_client(embedded_store: EmbeddedStore) -> Iterator[redis.Redis]:
    client = embedded_store.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def cluster_name() -> str:
    """A cluster of its own for each test, so tests sharing the store never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def node_env(immutant_home: Path, embedded_store: EmbeddedStore, cluster_name: str) -> dict[str, str]:
    """Environment for node subprocesses: the session's store, this test's cluster, free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
    env.update(
        IMMUTANT_HOME=str(immutant_home),
        IMMUTANT_CLUSTER=cluster_name,
        IMMUTANT_HTTP_PORT=str(free_port_base()),
        PYTHONUNBUFFERED="1",
    )
    if PORTABLE_ENV in os.environ:
        env[PORTABLE_ENV] = os.environ[PORTABLE_ENV]  # a portable run runs its nodes portably too
    return env


@pytest.fixture
def start_node(node_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``flask [--app APP] immutant run ARGS`` as a real process; all are cleaned up."""
    started: list[NodeProcess] = []

    def start(*args: str, app: str | None = None, env: dict[str, str] | None = None,
              cwd: str | Path | None = None, **_: Any) -> NodeProcess:
        command = (["--app", app] if app else []) + ["immutant", "run", *args]
        node = NodeProcess(command, {**node_env, **(env or {})}, cwd=cwd or tmp_path)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.cleanup()


class PrivateRedis:
    """A redis-server of one test on a private unix socket, which the test may stop and restart
    (for outage tests; the shared embedded store must stay up for everyone else)."""

    def __init__(self, folder: Path, tcp: bool = False) -> None:
        from flask_immutant.store.embedded import redis_server_binary

        self.binary = redis_server_binary()
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.port = free_port_base(1) if tcp else 0
        self.url = f"redis://127.0.0.1:{self.port}/0" if tcp else f"unix://{self.socket}"
        self.proc: Any = None

    def start(self) -> None:
        import subprocess

        from support import wait_until

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--unixsocket", str(self.socket),
             "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        try:
            wait_until(lambda: _pings(client), timeout=10, message=f"redis-server on {self.socket}")
        finally:
            client.close()

    def stop(self) -> None:
        """SIGKILL: an outage, not a goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A running :class:`PrivateRedis`, killed in ``finally``."""
    yield from _private_redis(tcp=False)


@pytest.fixture
def tcp_redis() -> Iterator[PrivateRedis]:
    """A running :class:`PrivateRedis` reached over TCP on 127.0.0.1, as stores on other hosts are
    (redis-py configures TCP and unix-socket connections differently)."""
    yield from _private_redis(tcp=True)


def _private_redis(tcp: bool) -> Iterator[PrivateRedis]:
    folder = Path(tempfile.mkdtemp(prefix="imr-"))
    server = PrivateRedis(folder, tcp=tcp)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _holding_proxy(target: str | Path) -> Iterator[HoldingProxy]:
    folder = Path(tempfile.mkdtemp(prefix="imp-"))
    proxy = HoldingProxy(target, folder)
    try:
        yield proxy
    finally:
        proxy.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def holding_proxy(embedded_store: EmbeddedStore) -> Iterator[HoldingProxy]:
    """A :class:`~support.HoldingProxy` in front of the shared embedded store."""
    yield from _holding_proxy(embedded_store.socket)


@pytest.fixture
def private_proxy(private_redis: PrivateRedis) -> Iterator[HoldingProxy]:
    """A :class:`~support.HoldingProxy` in front of this test's :class:`PrivateRedis`."""
    yield from _holding_proxy(private_redis.socket)


# --- tiers: markers from one rule, and services that skip locally but fail in CI ----------------

#: marker -> (module-name words, fixture-name words, parameter values) that put a test in it.
#: Fixture names are matched over the whole fixture closure, so a fixture built on ``node_env``
#: or ``start_node`` makes its users ``nodes`` tests too.
TIERS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "multihost": (("multihost", "netns"), ("netns", "namespace", "multihost"), ()),
    "browser": (("browser",), ("browser", "playwright"), ()),
    "haproxy": (("haproxy",), ("haproxy",), ("haproxy",)),
    "prometheus": (("prometheus",), ("prometheus",), ()),
    "rabbitmq": (("rabbitmq",), ("rabbitmq",), ("rabbitmq",)),
    "nodes": ((), ("node_env", "start_node", "nodes"), ()),
}
#: The tiers that need more than Python and the embedded store: checked before each such test.
SERVICE_TIERS = ("rabbitmq", "haproxy", "prometheus", "browser", "multihost")


def pytest_configure(config: pytest.Config) -> None:
    for name, about in [
        ("unit", "in-process tests (may use the shared embedded store); the fast tier: pytest -m unit"),
        ("nodes", "start node, balancer or CLI subprocesses"),
        ("rabbitmq", "need RabbitMQ on 127.0.0.1:5672"),
        ("haproxy", "need the haproxy binary"),
        ("prometheus", "need the prometheus server binary (Debian's prometheus package)"),
        ("browser", "need /usr/bin/chromium (Playwright drives it)"),
        ("multihost", "need root and network namespaces"),
    ]:
        config.addinivalue_line("markers", f"{name}: {about}")


def tiers_of(item: pytest.Item) -> set[str]:
    """The markers the rule gives ``item``: by its module's name, the fixtures it uses and its
    parameters; a test none of them matches is ``unit``."""
    module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].lower()
    fixtures = [name.lower() for name in getattr(item, "fixturenames", ())]
    callspec = getattr(item, "callspec", None)
    params = [str(value).lower() for value in callspec.params.values()] if callspec else []
    found = {
        tier for tier, (modules, fixture_words, values) in TIERS.items()
        if any(word in module for word in modules)
        or any(word in name for word in fixture_words for name in fixtures)
        or any(value in values for value in params)
    }
    if found & set(SERVICE_TIERS):
        found.add("nodes")  # a service test runs processes, never in the fast tier
    return found or {"unit"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for tier in tiers_of(item):
            item.add_marker(tier)


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def missing_service(tier: str) -> str | None:
    """Why the service a tier needs is not here, or None when it is."""
    if tier == "rabbitmq" and not _port_open(5672):
        return "RabbitMQ is not running on 127.0.0.1:5672 (apt-get install rabbitmq-server; .ci/run starts it)"
    if tier == "haproxy" and not (shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")):
        return "haproxy is not installed (apt-get install haproxy; .ci/run does)"
    if tier == "prometheus" and not shutil.which("prometheus"):
        return "the prometheus server is not installed (apt-get install prometheus; .ci/run does)"
    if tier == "browser" and not os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium is missing (apt-get install chromium; .ci/run does)"
    if tier == "multihost" and (os.geteuid() != 0 or not shutil.which("ip")):
        return "network namespaces need root and the ip command (iproute2)"
    return None


_MISSING: dict[str, str | None] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A missing service skips the test locally, with the reason; in CI (CI=true) it fails."""
    for tier in SERVICE_TIERS:
        if item.get_closest_marker(tier) is None:
            continue
        if tier not in _MISSING:
            _MISSING[tier] = missing_service(tier)
        reason = _MISSING[tier]
        if reason is not None:
            unavailable(reason)
