"""The portable path: with the Linux-only calls off (``IMMUTANT_PORTABLE=1``, as on macOS), an app
runtime still dies with its supervisor, through the lifeline pipe alone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from flask_immutant import portable

from support import pid_alive, wait_until

SUPERVISOR = textwrap.dedent("""
    import socket, sys, time
    from flask_immutant.server.node import AppTarget, RuntimeProcess
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    runtime = RuntimeProcess(AppTarget("app", root=sys.argv[1]), listener, {})
    runtime.spawn()
    print(runtime.process.pid, runtime.wait_ready(60), flush=True)
    time.sleep(600)
""")


def test_portable_mode_turns_every_linux_only_call_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(portable.PORTABLE_ENV, "1")
    assert not portable.linux_extras()
    assert portable.process_state(os.getpid()) is None
    assert portable.process_cmdline(os.getpid()) is None
    assert portable.process_host() is None and portable.process_start(os.getpid()) is None
    portable.set_parent_death_signal()  # a no-op, not an error
    monkeypatch.delenv(portable.PORTABLE_ENV)
    assert portable.linux_extras() == sys.platform.startswith("linux")


def test_a_runtime_dies_with_its_supervisor_through_the_lifeline_alone(
    embedded_store, immutant_home: Path, cluster_name: str, tmp_path: Path
):
    # Given a supervisor running an app runtime, with no parent-death signal (portable mode)
    (tmp_path / "app.py").write_text("from flask import Flask\napp = Flask(__name__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
    env.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name, IMMUTANT_PORTABLE="1")
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as output:
        supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=output, stdin=subprocess.DEVNULL)
    try:
        assert supervisor.stdout is not None
        pid, ready = supervisor.stdout.readline().split()
        assert ready == b"True", log.read_text()
        runtime_pid = int(pid)
        # When the supervisor is SIGKILLed (no code of it runs)
        supervisor.kill()
        supervisor.wait(10)
        # Then the runtime notices the lifeline's EOF and exits on its own
        wait_until(lambda: not pid_alive(runtime_pid), timeout=10, message="the runtime to exit")
        assert "the node supervisor is gone; app runtime exits" in log.read_text()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
        if "runtime_pid" in locals() and pid_alive(runtime_pid):
            os.kill(runtime_pid, signal.SIGKILL)
        if supervisor.stdout is not None:
            supervisor.stdout.close()


linux_only = pytest.mark.skipif(not portable.linux_extras(), reason="the proof of death reads Linux's /proc")


def recorded(pid: int) -> tuple[str | None, int, int | None]:
    """What a lease holder with ``pid`` records about itself: host, pid, start."""
    return portable.process_host(), pid, portable.process_start(pid)


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


@linux_only
def test_a_live_process_is_not_proven_dead(child):
    host, pid, start = recorded(child.pid)
    assert host and start is not None
    assert not portable.process_dead(host, pid, start)
    assert not portable.process_dead(*recorded(os.getpid()))


@linux_only
def test_a_stopped_process_is_alive(child):
    record = recorded(child.pid)
    os.kill(child.pid, signal.SIGSTOP)
    wait_until(lambda: portable.process_state(child.pid) == "T", timeout=5)
    assert not portable.process_dead(*record)


@linux_only
def test_a_reaped_process_is_proven_dead(child):
    record = recorded(child.pid)
    child.kill()
    child.wait()
    assert portable.process_dead(*record)


@linux_only
def test_a_zombie_is_proven_dead(child):
    record = recorded(child.pid)
    child.kill()  # not waited for: a zombie until the fixture reaps it
    wait_until(lambda: portable.process_state(child.pid) == "Z", timeout=5)
    assert portable.process_dead(*record)


@linux_only
def test_a_reused_pid_is_told_by_its_start_time(child):
    # Given a record of an earlier process with this pid (another start time)
    host, pid, start = recorded(child.pid)
    assert start is not None
    # Then the process it names is gone, whatever now has the pid
    assert portable.process_dead(host, pid, start - 1)


@linux_only
def test_a_zombie_leader_with_a_live_thread_is_alive():
    # Given a process whose main thread exited while another thread still runs (the leader shows Z)
    code = ("import ctypes, threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,)).start()\n"
            "ctypes.CDLL(None).pthread_exit(None)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    try:
        record = recorded(proc.pid)
        wait_until(lambda: portable.process_state(proc.pid) == "Z", timeout=10)
        # Then it is not taken for dead
        assert len(list(Path(f"/proc/{proc.pid}/task").iterdir())) == 2
        assert not portable.process_dead(*record)
    finally:
        proc.kill()
        proc.wait()


@linux_only
def test_nothing_is_proven_across_hosts_or_without_a_record(child):
    host, pid, start = recorded(child.pid)
    child.kill()
    child.wait()
    assert portable.process_dead(host, pid, start)
    # Another kernel boot or pid namespace, or a record written before hosts were recorded
    assert not portable.process_dead("another-boot/1:2/3:4", pid, start)
    assert not portable.process_dead(None, pid, start)
    assert not portable.process_dead(host, pid, None)
    assert not portable.process_dead(host, str(pid), start)


@linux_only
def test_nothing_is_proven_in_portable_mode_or_from_another_namespaces_proc(child, monkeypatch):
    record = recorded(child.pid)
    child.kill()
    child.wait()
    monkeypatch.setenv(portable.PORTABLE_ENV, "1")
    assert not portable.process_dead(*record)
    monkeypatch.delenv(portable.PORTABLE_ENV)
    # A /proc whose "self" is not this process (mounted from another pid namespace)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    assert portable.process_host() is None
    assert not portable.process_dead(*record)


@linux_only
def test_the_host_names_the_kernel_boot_and_the_pid_and_time_namespaces():
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    namespace = os.stat("/proc/self/ns/pid")
    assert portable.process_host() == portable.process_host()
    assert portable.process_host().startswith(f"{boot}/{namespace.st_dev}:{namespace.st_ino}/")
