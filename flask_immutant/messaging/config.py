"""The messaging feature's settings rows (contributed through ``immutant_settings``)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..settings import Setting, float_range, int_range, to_bool, url_hosts

#: The feature's on/off flag.
FLAG = "IMMUTANT_MESSAGING"

BROKER_SCHEMES = ("amqp", "amqps", "redis", "rediss", "unix")


def broker_url(value: Any) -> str | None:
    """Unset: Dramatiq's Redis broker on the cluster store; ``amqp://``: Dramatiq's RabbitMQ broker."""
    if value in (None, ""):
        return None
    allowed = "an amqp:// or amqps:// URL for RabbitMQ, a redis:// URL, or unset for the cluster store"
    if not isinstance(value, str) or urlsplit(value).scheme not in BROKER_SCHEMES:
        raise ValueError(allowed)
    url_hosts(value, "amqp://user:pass@host:5672/vhost")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting(FLAG, True, to_bool, "Messaging: load-balanced queues, topics and request/respond on "
            "Dramatiq.", "bool", env=True),
    Setting("IMMUTANT_BROKER_URL", None, broker_url, "Message broker. Unset: Dramatiq's Redis broker on "
            "the cluster store; amqp://user:pass@host:5672/vhost: Dramatiq's RabbitMQ broker.", "url", env=True),
    Setting("IMMUTANT_WORKER_THREADS", 8, int_range(1, 256), "Dramatiq worker threads per app runtime: "
            "handlers of all listeners run on them.", "int", env=True),
    Setting("IMMUTANT_MESSAGING_MAX_RETRIES", 5, int_range(0, 1000), "Times a raising handler is retried, "
            "with exponential backoff, before its message goes to the dead-letter queue.", "int", env=True),
    Setting("IMMUTANT_MESSAGING_MIN_BACKOFF", 1.0, float_range(0.01, 3600), "Seconds before the first "
            "retry of a failed message; each retry doubles it.", "seconds", env=True),
    Setting("IMMUTANT_MESSAGING_MAX_BACKOFF", 300.0, float_range(0.01, 86400), "Longest wait between "
            "retries of a failed message.", "seconds", env=True),
    Setting("IMMUTANT_MESSAGING_DEDUPE_WINDOW", 600.0, float_range(1, 7 * 86400), "Seconds during which "
            "a second message published with the same idempotency key (publish(..., key=...)) is dropped.",
            "seconds", env=True),
)
