"""The one table of ``IMMUTANT_*`` settings, and how they are resolved and validated.

Every key is declared once, as a :class:`Setting` row: core rows live in :data:`CORE_SETTINGS`,
feature plugins contribute theirs through the ``immutant_settings`` hook. Values are resolved
once, in this order (last wins): the row's default, ``app.config``, the process environment
(for rows marked ``env=True``), then explicit overrides such as CLI options.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ImmutantConfigError

PREFIX = "IMMUTANT_"


def _default_home() -> str:
    """Per user, not per folder: two shells in different folders join one cluster."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "flask-immutant")


# --- converters: raw value (from config, env or CLI) -> typed value, or ValueError(allowed) ---


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("a boolean (True/False, or 1/0, yes/no, on/off in the environment)")


def int_range(low: int, high: int | None = None) -> Callable[[Any], int]:
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(allowed)
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(allowed) from None
        if number < low or (high is not None and number > high):
            raise ValueError(allowed)
        return number

    return convert


def float_range(low: float, high: float) -> Callable[[Any], float]:
    allowed = f"a number of seconds from {low:g} to {high:g}"

    def convert(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(allowed)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(allowed) from None
        if not low <= number <= high:
            raise ValueError(allowed)
        return number

    return convert


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def identifier(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError("1-64 characters: letters, digits, '.', '_' or '-', not starting with a symbol")
    return value


def optional_identifier(value: Any) -> str | None:
    return None if value in (None, "") else identifier(value)


def path(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError("a filesystem path")
    return str(Path(os.path.expanduser(str(value))).absolute())


def host(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or " " in value:
        raise ValueError("a host name or IP address to bind, such as 127.0.0.1 or 0.0.0.0")
    return value.strip()


def advertise_host(value: Any) -> str | None:
    if value in (None, ""):
        return None
    address = value.strip() if isinstance(value, str) else ""
    if not address or " " in address or address in ("0.0.0.0", "::", "*"):
        raise ValueError("the address other nodes and balancers reach this node at, such as 10.0.0.5 or "
                         "node1.internal (not a wildcard)")
    return address


STORE_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


def redis_url(value: Any) -> str | None:
    if value in (None, ""):
        return None
    allowed = "a URL with scheme " + ", ".join(f"{s}://" for s in STORE_SCHEMES) + " (or unset for the embedded store)"
    if not isinstance(value, str):
        raise ValueError(allowed)
    parts = urlsplit(value)
    if parts.scheme not in STORE_SCHEMES:
        raise ValueError(allowed)
    if parts.scheme == "unix" and not parts.path:
        raise ValueError("unix:// needs a socket path, as in unix:///run/redis.sock")
    if parts.scheme.endswith("+sentinel") and not parts.path.strip("/"):
        raise ValueError("a sentinel URL needs a service name, as in redis+sentinel://host:26379/mymaster")
    return value


def import_paths(value: Any) -> tuple[str, ...]:
    allowed = "a list of import paths, or one comma-separated string of them"
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        items = list(value)
    else:
        raise ValueError(allowed)
    for item in items:
        if not re.match(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$", item):
            raise ValueError(allowed)
    return tuple(items)


@dataclass(frozen=True)
class Setting:
    """One row of the settings table.

    ``convert`` turns a raw value into the typed one or raises ``ValueError`` whose message says
    what is allowed. ``env`` marks node-level settings that the process environment may set
    (``IMMUTANT_HOME=... flask immutant status``).
    """

    name: str
    default: Any
    convert: Callable[[Any], Any]
    help: str
    type: str
    env: bool = False

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"setting names start with {PREFIX}: {self.name!r}")


CORE_SETTINGS: tuple[Setting, ...] = (
    Setting("IMMUTANT_HOME", None, path, "Folder for the embedded store and the node data dirs. "
            "Default: $XDG_DATA_HOME/flask-immutant (per user).", "path", env=True),
    Setting("IMMUTANT_CLUSTER", "immutant", identifier, "Cluster name; every key of the cluster "
            "lives under it, so several clusters can share one Redis.", "name", env=True),
    Setting("IMMUTANT_REDIS_URL", None, redis_url, "Cluster store: redis://, rediss:// (TLS), "
            "unix:// or redis+sentinel://host:port[,host:port]/service[/db]. Unset: the embedded "
            "store under IMMUTANT_HOME.", "url", env=True),
    Setting("IMMUTANT_CLUSTERED", False, to_bool, "Join the cluster. Off, a node is a cluster of "
            "one: singletons run on it regardless of other nodes.", "bool", env=True),
    Setting("IMMUTANT_NODE_NAME", None, optional_identifier, "Node name. Default: the host name, "
            "plus the port offset when it is not 0.", "name", env=True),
    Setting("IMMUTANT_HOST", "127.0.0.1", host, "Address the node's HTTP server binds.",
            "host", env=True),
    Setting("IMMUTANT_ADVERTISE_HOST", None, advertise_host, "Address other nodes and balancers reach "
            "this node at. Default: IMMUTANT_HOST; required when that is a wildcard (0.0.0.0, ::), "
            "and for containers, NAT and multi-homed hosts.", "host", env=True),
    Setting("IMMUTANT_HTTP_PORT", 8080, int_range(1, 65535), "Base HTTP port; the node serves on "
            "this plus IMMUTANT_PORT_OFFSET.", "int", env=True),
    Setting("IMMUTANT_PORT_OFFSET", 0, int_range(0, 60000), "Added to every port of the node, so "
            "several nodes share one machine.", "int", env=True),
    Setting("IMMUTANT_THREADS", 8, int_range(1, 512), "Request threads of the WSGI server in each "
            "app runtime.", "int", env=True),
    Setting("IMMUTANT_FAILURE_TIMEOUT", 2.0, float_range(0.5, 300), "Seconds without a heartbeat "
            "after which a node is taken for dead; heartbeats go every quarter of it.",
            "seconds", env=True),
    Setting("IMMUTANT_SHUTDOWN_TIMEOUT", 10.0, float_range(0.5, 600), "Seconds a graceful stop "
            "waits for app runtimes before killing them.", "seconds", env=True),
    Setting("IMMUTANT_PLUGINS", (), import_paths, "Extra plugin modules to load, by import path.",
            "list", env=True),
)


class Settings(Mapping[str, Any]):
    """Resolved, validated settings: a read-only mapping of ``IMMUTANT_*`` keys to typed values."""

    def __init__(self, values: Mapping[str, Any], rows: Mapping[str, Setting]) -> None:
        self._values = dict(values)
        self.rows = dict(rows)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"

    def environ(self) -> dict[str, str]:
        """The node-level settings as environment variables, for a child process."""
        env: dict[str, str] = {}
        for name, row in self.rows.items():
            value = self._values[name]
            if not row.env or value is None:
                continue
            if isinstance(value, bool):
                env[name] = "1" if value else "0"
            elif isinstance(value, tuple):
                env[name] = ",".join(value)
            else:
                env[name] = str(value)
        return env


def table(rows: Iterable[Setting]) -> dict[str, Setting]:
    """Index rows by name; a key declared twice is a programming error in a plugin."""
    indexed: dict[str, Setting] = {}
    for row in rows:
        if row.name in indexed:
            raise ImmutantConfigError(f"setting {row.name} is declared twice")
        indexed[row.name] = row
    return indexed


def resolve(
    rows: Mapping[str, Setting],
    config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Apply defaults, the config, the environment and overrides; validate every value once.

    Raises :class:`ImmutantConfigError` naming the key, the value and what is allowed, or, for an
    unknown ``IMMUTANT_*`` key, the closest known one.
    """
    config = config or {}
    environ = os.environ if environ is None else environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in (*config, *overrides):
        if key.startswith(PREFIX) and key not in rows:
            raise ImmutantConfigError(_unknown(key, rows))
    values: dict[str, Any] = {}
    for name, row in rows.items():
        source, raw = "default", row.default
        if name in config:
            source, raw = "app.config", config[name]
        if row.env and name in environ:
            source, raw = "environment", environ[name]
        if name in overrides:
            source, raw = "option", overrides[name]
        if raw is None and source == "default":
            values[name] = None
            continue
        try:
            values[name] = row.convert(raw)
        except ValueError as exc:
            raise ImmutantConfigError(f"{name}={raw!r} (from {source}) is not allowed: expected {exc}") from None
    if values.get("IMMUTANT_HOME") is None and "IMMUTANT_HOME" in rows:
        values["IMMUTANT_HOME"] = path(_default_home())
    return Settings(values, rows)


def _unknown(key: str, rows: Mapping[str, Setting]) -> str:
    # Compare what follows the prefix: the shared "IMMUTANT_" alone would make any key look close.
    names = {name.removeprefix(PREFIX): name for name in rows}
    close = difflib.get_close_matches(key.removeprefix(PREFIX), list(names), n=1, cutoff=0.6)
    hint = f"; did you mean {names[close[0]]}?" if close else "; see the settings table in the README"
    return f"{key} is not a flask-immutant setting{hint}"


def unknown_environment(rows: Mapping[str, Setting], environ: Mapping[str, str] | None = None) -> list[str]:
    """Misspelled ``IMMUTANT_*`` environment variables, as warnings (the environment is shared)."""
    environ = os.environ if environ is None else environ
    return [_unknown(key, rows) for key in environ if key.startswith(PREFIX) and key not in rows]


def markdown_table(rows: Iterable[Setting]) -> str:
    """The README's settings table; ``tests/test_docs.py`` checks the README against it."""
    lines = ["| Setting | Type | Default | Environment | Meaning |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        if row.name == "IMMUTANT_HOME":
            default = "per user"
        else:
            default = "unset" if row.default in (None, ()) else f"`{row.default}`"
        lines.append(f"| `{row.name}` | {row.type} | {default} | {'yes' if row.env else 'no'} | {row.help} |")
    return "\n".join(lines)


__all__ = [
    "CORE_SETTINGS",
    "Setting",
    "Settings",
    "advertise_host",
    "float_range",
    "host",
    "identifier",
    "import_paths",
    "int_range",
    "markdown_table",
    "path",
    "redis_url",
    "resolve",
    "table",
    "to_bool",
    "unknown_environment",
]
