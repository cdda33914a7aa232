"""The jobs declared by one app, stored and driven once its runtime has started."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..cluster.lease import lease_manager, singleton_name
from ..protocols import Slot
from ..state import ImmutantState, get_state
from .driver import JobDriver
from .spec import JobSpec
from .store import JobStore

if TYPE_CHECKING:
    from flask import Flask



class JobRegistry:
    def __init__(self, state: ImmutantState) -> None:
        self.state = state
        self.specs: dict[str, JobSpec] = {}
        self.functions: dict[str, Callable[[], Any]] = {}
        self.driver: JobDriver | None = None
        self.store: JobStore | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.driver is not None

    def add(self, spec: JobSpec, function: Callable[[], Any]) -> None:
        with self._lock:
            self.specs[spec.name] = spec
            self.functions[spec.name] = function
        if self.store is not None and spec.singleton:
            self.store.upsert(spec)
        if self.driver is not None:
            self.driver.forget_local(spec.name)
            self.driver.changed()

    def remove(self, name: str) -> bool:
        with self._lock:
            spec = self.specs.pop(name, None)
            self.functions.pop(name, None)
        if self.store is not None:
            self.store.remove(name)
        if self.driver is not None:
            self.driver.forget_local(name)
        return spec is not None

    def activate(self) -> None:
        runtime = self.state.runtime
        assert runtime is not None
        self.store = JobStore(self.state.store, self.state.keys, self.state.app_id or runtime.app.name)
        for spec in list(self.specs.values()):
            if spec.singleton:
                self.store.upsert(spec)
        self.driver = JobDriver(runtime.app, self.store, self.state.node_name,
                                self.state.settings["IMMUTANT_FAILURE_TIMEOUT"], self.functions, self.specs)
        lease = singleton_name(self.state, f"scheduler:{self.store.app}")
        self.driver.start(lease_manager(self.state), lease)

    def shutdown(self) -> None:
        if self.driver is not None:
            self.driver.stop()
            self.driver = None


#: Where an app's :class:`JobRegistry` is kept in its state.
JOBS: Slot[JobRegistry] = Slot("jobs")


def registry(app: Flask | None = None, state: ImmutantState | None = None) -> JobRegistry:
    return (state or get_state(app)).feature(JOBS, JobRegistry)
