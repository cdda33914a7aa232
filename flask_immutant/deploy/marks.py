"""A node's high-water marks: the newest ``(epoch, version)`` it has seen of each deployment name.

Kept in the node's own data dir, not in the store, so whoever can write the store cannot lower
them: writing back an older signed record is refused instead of rolling the node back. Only a
signed record with a newer epoch (``deploy --rollback``) goes below a mark. A name the node saw
undeployed is marked too, so its last record written back is refused (undeploy cannot be undone by
a store writer); a new deploy of the name is a newer version and passes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("flask_immutant.deploy")

Order = tuple[int, int]
#: Third element of a mark whose record was undeployed.
UNDEPLOYED = "undeployed"


class HighWaterMarks:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._undeployed: set[str] = set()
        self._marks = self._load()

    def _load(self) -> dict[str, Order]:
        try:
            data = json.loads(self.path.read_text())
            marks = {str(name): (int(order[0]), int(order[1])) for name, order in data.items()}
            self._undeployed = {str(name) for name, order in data.items() if order[2:] == [UNDEPLOYED]}
            return marks
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            # Refusing everything would leave the node useless; say so loudly and start afresh.
            log.error("high-water marks %s are unreadable (%s); starting from none", self.path, exc)
            return {}

    def get(self, name: str) -> Order | None:
        with self._lock:
            return self._marks.get(name)

    def undeployed(self, name: str) -> bool:
        """Whether the node saw ``name`` undeployed after the record of its mark."""
        with self._lock:
            return name in self._undeployed

    def raise_to(self, name: str, order: Order) -> None:
        """Record ``order`` for ``name`` if it is newer."""
        with self._lock:
            if self._marks.get(name, (-1, -1)) >= order:
                return
            self._marks[name] = order
            self._undeployed.discard(name)
            self._write()

    def mark_undeployed(self, name: str) -> None:
        """Record that the record of ``name``'s mark was removed: it may never run here again."""
        with self._lock:
            if name not in self._marks or name in self._undeployed:
                return
            self._undeployed.add(name)
            self._write()

    def _write(self) -> None:
        """Write through (under the lock) before anything runs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({k: [*v, UNDEPLOYED] if k in self._undeployed else list(v)
                       for k, v in self._marks.items()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)
