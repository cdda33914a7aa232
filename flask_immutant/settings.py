"""The one table of ``IMMUTANT_*`` settings, and how they are resolved and validated.

Every key is declared once, as a :class:`Setting` row: core rows live in :data:`CORE_SETTINGS`,
feature plugins contribute theirs through the ``immutant_settings`` hook. Values are resolved
once, in this order (last wins): the row's default, ``app.config``, the process environment
(for rows marked ``env=True``), then explicit overrides such as CLI options.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import names
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


def identifier(value: Any) -> str:
    return names.name(value)


def optional_identifier(value: Any) -> str | None:
    return None if value in (None, "") else identifier(value)


def path(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError("a filesystem path")
    return str(Path(os.path.expanduser(str(value))).absolute())


def host(value: Any) -> str:
    return names.host(value.strip() if isinstance(value, str) else value)


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
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs a socket path, as in unix:///run/redis.sock")
        return value
    path = [p for p in parts.path.split("/") if p]
    if parts.scheme.endswith("+sentinel"):
        if not path:
            raise ValueError("a sentinel URL needs a service name, as in redis+sentinel://host:26379/mymaster")
        db = path[1:]
        hosts = parts.netloc.rpartition("@")[2].split(",")
        for item in hosts:
            _host_port(item, "sentinel host:port, as in redis+sentinel://h1:26379,h2:26379/mymaster")
    else:
        db = path
        _host_port(parts.netloc.rpartition("@")[2], "host:port, as in redis://localhost:6379/0")
    if len(db) > 1 or (db and not db[0].isdigit()):
        raise ValueError(f"a database number after the last '/', as in redis://localhost:6379/0; not {'/'.join(db)!r}")
    return value


def url_hosts(value: str, example: str) -> None:
    """Every ``host[:port]`` of a URL's comma-separated host list (credentials left out) is well
    formed; else ValueError naming the bad one. Shared by every URL setting."""
    for item in urlsplit(value).netloc.rpartition("@")[2].split(","):
        _host_port(item, f"host:port, as in {example}")


def _host_port(item: str, allowed: str) -> None:
    """One ``host[:port]`` of a store URL: a port, when given, is a number from 1 to 65535."""
    host_part, colon, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
    if not colon:
        host_part, port = item, ""
    if not host_part or (port and not (port.isdigit() and 0 < int(port) < 65536)) or (colon and not port):
        raise ValueError(f"{allowed} (port 1-65535); not {item!r}")


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


def networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    allowed = "IP addresses or networks, as a list or one comma-separated string, such as 127.0.0.1, 10.0.0.0/8"
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(allowed)
    try:
        return tuple(ipaddress.ip_network(item if not isinstance(item, str) else item.strip("[]"), strict=False)
                     for item in items)
    except (TypeError, ValueError):
        raise ValueError(allowed) from None


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
    Setting("IMMUTANT_APP_ID", None, optional_identifier, "What this app's jobs, scheduler lease and "
            "sessions are keyed by in the cluster. Unset: the deployment name, or the Flask app's name for "
            "the app a node was started with (`--app`).", "name"),
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
    Setting("IMMUTANT_HTTP_CONNECTION_LIMIT", 1000, int_range(10, 100000), "Open HTTP connections "
            "each app runtime, and the embedded balancer's pool to the nodes, hold at once; more wait "
            "in the listen backlog. See docs/security.md.", "int", env=True),
    Setting("IMMUTANT_HTTP_IDLE_TIMEOUT", 30.0, float_range(1, 3600), "Seconds an HTTP connection "
            "may stay silent (no request byte, no response byte) before it is closed.", "seconds",
            env=True),
    Setting("IMMUTANT_HTTP_READ_TIMEOUT", 60.0, float_range(1, 3600), "Seconds a client has to "
            "send one whole request, head and body; a slower one is cut off (a 408 at the embedded "
            "balancer), so slow uploads cannot hold connections for ever.", "seconds", env=True),
    Setting("IMMUTANT_HTTP_MAX_BODY", 1 << 30, int_range(1024), "Largest request body in bytes; a "
            "larger one is refused with 413 (by the embedded balancer and the app runtime).", "int",
            env=True),
    Setting("IMMUTANT_TRUSTED_PROXIES", (), networks, "Addresses or networks (comma-separated) "
            "whose X-Forwarded-For/-Proto/-Host the app runtime believes, such as 127.0.0.1 for an "
            "embedded balancer on the same machine. Empty: believed from nobody.", "list", env=True),
    Setting("IMMUTANT_FAILURE_TIMEOUT", 2.0, float_range(0.5, 300), "Seconds without a heartbeat "
            "after which a node is taken for dead; heartbeats go every quarter of it.",
            "seconds", env=True),
    Setting("IMMUTANT_LEASE_REPLICAS", 0, int_range(0, 16), "Replicas that must confirm (Redis WAIT) "
            "every lease acquisition and renewal before its holder acts: 0 for a single store, 1 for "
            "Sentinel with two replicas (docs/guarantees.md).", "int", env=True),
    Setting("IMMUTANT_SHUTDOWN_TIMEOUT", 10.0, float_range(0.5, 600), "Seconds a graceful stop "
            "waits for app runtimes before killing them.", "seconds", env=True),
    Setting("IMMUTANT_PLUGINS", (), import_paths, "Extra plugin modules to load, by import path.",
            "list", env=True),
)


class Settings(Mapping[str, Any]):
    """Resolved, validated settings: a read-only mapping of ``IMMUTANT_*`` keys to typed values."""

    def __init__(self, values: Mapping[str, Any], rows: Mapping[str, Setting],
                 sources: Mapping[str, str] | None = None) -> None:
        self._values = dict(values)
        self.rows = dict(rows)
        self._sources = dict(sources or {})  # name -> "app.config" | "environment" | "option" (else default)

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
                env[name] = ",".join(str(item) for item in value)
            else:
                env[name] = str(value)
        return env

    def runtime_environ(self) -> dict[str, str]:
        """What an app runtime inherits from its node: every core row (store, cluster, identity,
        HTTP server: a node and its runtimes must agree on them), and a feature's row only when
        the node's environment or an option set it. A feature row at its default is no choice of
        the operator's, so the app's own config decides it (a deployed app's retries, say)."""
        core = {row.name for row in CORE_SETTINGS}
        return {name: value for name, value in self.environ().items()
                if name in core or self._sources.get(name) in ("environment", "option")}


def table(rows: Iterable[Setting]) -> dict[str, Setting]:
    """Index rows by name; a key declared twice is a programming error in a plugin."""
    indexed: dict[str, Setting] = {}
    for row in rows:
        if row.name in indexed:
            raise ImmutantConfigError(f"setting {row.name} is declared twice")
        indexed[row.name] = row
    return indexed


#: Where a value can come from, lowest precedence first: the last one that has the key wins.
#: ``option`` is an explicit override: a CLI option, ``deploy --set`` for a deployed app.
SOURCES = ("default", "app.config", "environment", "option")


def pick(
    row: Setting, config: Mapping[str, Any], environ: Mapping[str, str], overrides: Mapping[str, Any]
) -> tuple[str, Any]:
    """The precedence rule, in one place: ``(source, raw value)`` of ``row``. The environment
    counts only for rows marked ``env=True``; an override of ``None`` means "not given"."""
    source, raw = "default", row.default
    if row.name in config:
        source, raw = "app.config", config[row.name]
    if row.env and row.name in environ:
        source, raw = "environment", environ[row.name]
    if overrides.get(row.name) is not None:
        source, raw = "option", overrides[row.name]
    return source, raw


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
    sources: dict[str, str] = {}
    for name, row in rows.items():
        source, raw = pick(row, config, environ, overrides)
        if raw is None and source == "default":
            values[name] = None
            continue
        sources[name] = source
        try:
            values[name] = row.convert(raw)
        except (ValueError, TypeError) as exc:
            raise ImmutantConfigError(f"{name}={raw!r} (from {source}) is not allowed: expected {exc}") from None
    if values.get("IMMUTANT_HOME") is None and "IMMUTANT_HOME" in rows:
        values["IMMUTANT_HOME"] = path(_default_home())
    _check_together(values, sources)
    return Settings(values, rows, sources)


def _check_together(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Rules that span rows, with the same kind of message as one row's."""
    port, offset = values.get("IMMUTANT_HTTP_PORT"), values.get("IMMUTANT_PORT_OFFSET")
    if isinstance(port, int) and isinstance(offset, int) and port + offset > 65535:
        raise ImmutantConfigError(
            f"IMMUTANT_HTTP_PORT={port} (from {sources['IMMUTANT_HTTP_PORT']}) plus IMMUTANT_PORT_OFFSET={offset} "
            f"(from {sources['IMMUTANT_PORT_OFFSET']}) is {port + offset}: expected a sum of at most 65535")


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
    "url_hosts",
]
