"""Destinations: ``/queue/...`` and ``/topic/...`` names, and the Dramatiq queues behind them."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from .errors import MessagingError

Kind = Literal["queue", "topic"]
KINDS: tuple[Kind, ...] = ("queue", "topic")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _slug(text: str) -> str:
    """A Dramatiq-safe rendering of ``text``; a short digest keeps distinct names distinct."""
    clean = _UNSAFE.sub("_", text).strip("_") or "root"
    if clean == text:
        return clean
    return f"{clean[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Destination:
    """A named queue or topic of one cluster.

    A queue is one Dramatiq queue shared by every listener (each message goes to one of them).
    A topic has one Dramatiq queue per subscription (each subscription gets every message).
    """

    name: str
    kind: Kind
    cluster: str

    @classmethod
    def parse(cls, name: str, cluster: str, kind: str | None = None) -> Destination:
        if not isinstance(name, str) or not name.strip():
            raise MessagingError(f"a destination name is a non-empty string such as '/queue/orders', not {name!r}")
        if kind is None:
            if name.startswith("/queue/") and len(name) > 7:
                kind = "queue"
            elif name.startswith("/topic/") and len(name) > 7:
                kind = "topic"
            else:
                raise MessagingError(
                    f"cannot tell whether {name!r} is a queue or a topic: name it '/queue/...' or "
                    "'/topic/...', or pass kind='queue' or kind='topic'"
                )
        if kind not in KINDS:
            raise MessagingError(f"kind={kind!r} is not allowed: expected 'queue' or 'topic'")
        return cls(name, kind, cluster)

    @property
    def short(self) -> str:
        for prefix in ("/queue/", "/topic/"):
            if self.name.startswith(prefix):
                return self.name[len(prefix):]
        return self.name

    @functools.cached_property
    def queue_name(self) -> str:
        """The Dramatiq queue of a queue destination (cluster-prefixed: RabbitMQ may be shared);
        computed once (every publish asks)."""
        return f"{self.cluster}.q.{_slug(self.short)}"

    @functools.cached_property
    def queue_actors(self) -> tuple[tuple[str, str], ...]:
        """``(Dramatiq queue, its actor)`` of a queue destination, computed once (every publish asks)."""
        return ((self.queue_name, actor_name(self.queue_name)),)

    def subscription_queue(self, subscriber: str) -> str:
        """The Dramatiq queue of one subscription to a topic (``subscriber``: durable name or a
        per-listener id)."""
        return f"{self.cluster}.t.{_slug(self.short)}.{_slug(subscriber)}"


def actor_name(queue_name: str) -> str:
    """The Dramatiq actor that delivers the messages of ``queue_name``."""
    return f"immutant:{queue_name}"
