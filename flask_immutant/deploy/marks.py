"""A node's high-water marks: the newest ``(epoch, version)`` it has seen of each deployment name.

Kept in the node's own data dir, not in the store, so whoever can write the store cannot lower
them: writing back an older signed record is refused instead of rolling the node back. Only a
signed record with a newer epoch (``deploy --rollback``) goes below a mark.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("flask_immutant.deploy")

Order = tuple[int, int]


class HighWaterMarks:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._marks = self._load()

    def _load(self) -> dict[str, Order]:
        try:
            data = json.loads(self.path.read_text())
            return {str(name): (int(order[0]), int(order[1])) for name, order in data.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            # Refusing everything would leave the node useless; say so loudly and start afresh.
            log.error("high-water marks %s are unreadable (%s); starting from none", self.path, exc)
            return {}

    def get(self, name: str) -> Order | None:
        with self._lock:
            return self._marks.get(name)

    def raise_to(self, name: str, order: Order) -> None:
        """Record ``order`` for ``name`` if it is newer; written through before anything runs."""
        with self._lock:
            if self._marks.get(name, (-1, -1)) >= order:
                return
            self._marks[name] = order
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.name + ".partial")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({k: list(v) for k, v in self._marks.items()}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, self.path)
