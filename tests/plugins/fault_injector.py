"""Test plugin: make the background loops of a process raise on demand.

Loaded with ``IMMUTANT_PLUGINS=fault_injector`` and ``tests/plugins`` on ``PYTHONPATH``. While
the file named by ``FAULTS_FILE`` holds a JSON list of loop names (``"*"``: every loop but the
health reporter, which is how the failures reach ``status``), each step of those loops raises
``RuntimeError("injected into NAME")`` before doing its work. A thread started by the first hook
every process calls (``immutant_settings``: nodes, app runtimes, the balancer, the CLI) wraps the
step of each loop the process runs, as they start. Without ``FAULTS_FILE`` it does nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from flask_immutant import hookimpl, loops

ENV_VAR = "FAULTS_FILE"

_lock = threading.Lock()
_started = False


def _injected(name: str) -> bool:
    try:
        with open(os.environ[ENV_VAR]) as handle:
            names = json.load(handle)
    except (OSError, ValueError, KeyError):
        return False
    return name in names or ("*" in names and name != "health-reporter")


def _wrap(loop: loops.Loop) -> None:
    step = loop.step

    def faulty() -> Any:
        if _injected(loop.name):
            raise RuntimeError(f"injected into {loop.name}")
        return step()

    faulty.injector = True  # type: ignore[attr-defined]
    loop.step = faulty


def _watch() -> None:
    while True:
        for loop in loops.running():
            if not getattr(loop.step, "injector", False):
                _wrap(loop)
        time.sleep(0.02)


@hookimpl
def immutant_settings() -> list[Any]:
    global _started
    with _lock:
        if not _started and os.environ.get(ENV_VAR):
            _started = True
            threading.Thread(target=_watch, name="fault-injector", daemon=True).start()
    return []
