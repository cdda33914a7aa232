"""Fixtures: one real embedded redis-server per test session, a fresh cluster name per test,
and node subprocesses that are always cleaned up."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from flask_immutant.store import EmbeddedStore
from support import NodeProcess, free_port_base


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
        pid = store.pid()
        with contextlib.suppress(Exception):
            store.stop(timeout=5)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


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
