"""The one set of rules for names that reach file paths, store keys and balancer configuration.

Deployment names become folders under a node's data dir, context paths and hosts end up in
HAProxy's configuration and runtime-API commands, node names in both. Each is checked here, with
one small character set and a length bound, at every entry point: the CLI, records read from the
store, the context registry and the balancer writers. Each checker returns the value (normalised
where noted) or raises ``ValueError`` whose message says what is allowed, like a setting converter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: Longest deployment, node, cluster or app name.
NAME_MAX = 64
#: Longest context path.
CONTEXT_PATH_MAX = 200
#: Longest host name (DNS's limit).
HOST_MAX = 253

_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_MAX - 1}}}")
NAME_ALLOWED = (f"1-{NAME_MAX} characters: letters, digits, '.', '_' or '-', starting with a letter or digit")

_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]+")
CONTEXT_PATH_ALLOWED = (f"'/' or a path of up to {CONTEXT_PATH_MAX} characters such as /shop/cart: segments of "
                        "letters, digits, '.', '_', '~' or '-' (no '.' or '..' segment, no space or other symbol)")

_HOST = re.compile(rf"[A-Za-z0-9_.:%-]{{1,{HOST_MAX}}}")
HOST_ALLOWED = "a host name or IP address such as 127.0.0.1, ::1 or node-1.example.com (no space or other symbol)"

_SHA256 = re.compile(r"[0-9a-f]{64}")


def name(value: Any) -> str:
    """A deployment, node, cluster, cache or app name: safe as a folder name, a key part and an
    HAProxy server name."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(NAME_ALLOWED)
    return value


def context_path(value: Any) -> str:
    """A URL prefix, normalised without its trailing slash (``/shop/`` -> ``/shop``)."""
    allowed = CONTEXT_PATH_ALLOWED
    if not isinstance(value, str) or not value.startswith("/") or len(value) > CONTEXT_PATH_MAX:
        raise ValueError(allowed)
    inner = value.strip("/") if value.endswith("/") else value[1:]
    if not inner:
        if value != "/":
            raise ValueError(allowed)
        return "/"
    segments = inner.split("/")
    if any(not _SEGMENT.fullmatch(s) or s in (".", "..") for s in segments):
        raise ValueError(allowed)
    return "/" + "/".join(segments)


def host(value: Any) -> str:
    if not isinstance(value, str) or not _HOST.fullmatch(value):
        raise ValueError(HOST_ALLOWED)
    return value


def sha256_hex(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError("a sha256 digest: 64 lowercase hexadecimal digits")
    return value


def child(base: Path, *parts: str) -> Path:
    """``base/parts...`` after checking each part is a :func:`name` and the result stays inside
    ``base`` (the last guard where a path is built from a stored value)."""
    for part in parts:
        name(part)
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base.resolve()):
        raise ValueError(f"{path} is outside {base}")
    return path


def checked(kind: Any, value: Any, what: str) -> Any:
    """``kind(value)``, or ``ValueError`` naming ``what`` and the value: ``name 'x y': expected ...``."""
    try:
        return kind(value)
    except ValueError as exc:
        raise ValueError(f"{what} {value!r}: expected {exc}") from None
