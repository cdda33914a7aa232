"""The portable path: with the Linux-only calls off (``IMMUTANT_PORTABLE=1``, as on macOS), an app
runtime still dies with its supervisor, through the lifeline pipe alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
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
