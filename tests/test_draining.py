"""DrainingRuntimes (server/draining.py) on real child processes."""

from __future__ import annotations

import socket
import subprocess
import sys

from flask_immutant.server.draining import DrainingRuntimes
from flask_immutant.server.supervisor import AppTarget, RuntimeProcess

from support import wait_until, within

#: A runtime that ignores SIGTERM: only its deadline's kill ends it.
STUCK = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"


def stuck_runtime(label: str, listeners: list[socket.socket]) -> RuntimeProcess:
    listeners.append(socket.socket())
    runtime = RuntimeProcess(AppTarget(label, "/tmp"), listeners[-1], {})
    runtime.process = subprocess.Popen([sys.executable, "-c", STUCK], stdout=subprocess.PIPE)
    assert runtime.process.stdout is not None
    runtime.process.stdout.readline()
    return runtime


def test_a_failing_callback_holds_up_no_other_drain() -> None:
    """Regression: a ``then`` that raised failed the whole step; the other drains due with it
    waited for the loop's retry, 60 s later (its idle interval)."""
    drains = DrainingRuntimes()
    drains.start()
    ran: list[str] = []
    listeners: list[socket.socket] = []
    first, second = stuck_runtime("first", listeners), stuck_runtime("second", listeners)
    try:

        def fail() -> None:
            raise RuntimeError("then failed")

        # Given two runtimes that ignore SIGTERM, due at once, the first one's callback failing
        drains.begin(first, 0.3, then=fail)
        drains.begin(second, 0.3, then=lambda: ran.append("second"))
        # Then both are killed at their deadline and the second one's callback runs
        wait_until(lambda: ran == ["second"], timeout=within(10), message="the second drain's callback")
        assert first.process is not None and first.process.poll() is not None
        assert second.process is not None and second.process.poll() is not None
    finally:
        drains.stop()
        for runtime in (first, second):
            if runtime.process is not None and runtime.process.poll() is None:
                runtime.process.kill()
            if runtime.process is not None and runtime.process.stdout is not None:
                runtime.process.stdout.close()
        for listener in listeners:
            listener.close()
