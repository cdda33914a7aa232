"""The daemons declared by one app, and their runners once its runtime has started."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ..cluster.lease import lease_manager, singleton_name
from ..protocols import Slot
from ..state import ImmutantState, get_state
from .runner import DaemonRunner, DaemonSpec

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("flask_immutant.daemons")



class DaemonRegistry:
    def __init__(self, state: ImmutantState) -> None:
        self.state = state
        self.specs: dict[str, DaemonSpec] = {}
        self.runners: dict[str, DaemonRunner] = {}
        self.node = state.node_name
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.state.runtime is not None and not self.state.runtime.stopping.is_set()

    def add(self, spec: DaemonSpec) -> None:
        with self._lock:
            old = self.runners.pop(spec.name, None)
            self.specs[spec.name] = spec
        if old is not None:
            old.shutdown()
        if self.active:
            self._activate(spec)

    def remove(self, name: str) -> bool:
        with self._lock:
            spec = self.specs.pop(name, None)
            runner = self.runners.pop(name, None)
        if runner is not None:
            runner.shutdown()
        return spec is not None

    def activate_all(self) -> None:
        for spec in list(self.specs.values()):
            self._activate(spec)

    def shutdown(self) -> None:
        with self._lock:
            runners, self.runners = list(self.runners.values()), {}
        for runner in runners:
            runner.shutdown()

    def lease_name(self, spec: DaemonSpec) -> str:
        return singleton_name(self.state, f"daemon:{spec.name}")

    def _activate(self, spec: DaemonSpec) -> None:
        runtime = self.state.runtime
        assert runtime is not None
        runner = DaemonRunner(spec, runtime.app, self.node, self.state.keys, self.state.store,
                              lease_manager(self.state) if spec.singleton else None, self.lease_name(spec))
        with self._lock:
            self.runners[spec.name] = runner
        runner.activate()


#: Where an app's :class:`DaemonRegistry` is kept in its state.
DAEMONS: Slot[DaemonRegistry] = Slot("daemons")


def registry(app: Flask | None = None, state: ImmutantState | None = None) -> DaemonRegistry:
    return (state or get_state(app)).feature(DAEMONS, DaemonRegistry)
