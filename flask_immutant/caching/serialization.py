"""How cache entries and session values become bytes: msgpack or JSON, pickle only on request.

Data read back from the store is data anyone who can write to Redis controls, so the default
formats can only produce plain values (dicts, lists, strings, numbers, bytes with msgpack) and, in
a cache's msgpack, the closed set of types of ``typed.py``.
``pickle`` would run code chosen by whoever wrote the bytes; it is available for caches only,
by explicit choice, and never for sessions.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol, cast

import msgpack

from .typed import TypedMsgpackSerializer


class Serializer(Protocol):
    """Turns a value into bytes and back; ``loads`` raises ``ValueError`` on bytes it cannot read."""

    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class MsgpackSerializer:
    """msgpack: compact and fast; tuples come back as lists, bytes stay bytes."""

    name = "msgpack"

    def dumps(self, value: Any) -> bytes:
        return cast(bytes, msgpack.packb(value, use_bin_type=True))  # msgpack is untyped

    def loads(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise ValueError(f"not msgpack: {exc}") from None


class JsonSerializer:
    """JSON: readable with redis-cli; no bytes, tuples come back as lists."""

    name = "json"

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from None


class PickleSerializer:
    """pickle: any picklable object. Reading runs code named by the bytes: opt-in, caches only."""

    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)  # explicit opt-in only, see docs/caching.md
        except Exception as exc:
            raise ValueError(f"not a pickle: {exc}") from None


#: The safe formats, by name (sessions accept only these).
SAFE_SERIALIZERS: dict[str, Serializer] = {"msgpack": MsgpackSerializer(), "json": JsonSerializer()}
#: Every format a cache accepts, by name; a cache's msgpack keeps tuples, responses and HTTP errors.
CACHE_SERIALIZERS: dict[str, Serializer] = {**SAFE_SERIALIZERS, "msgpack": TypedMsgpackSerializer(),
                                            "pickle": PickleSerializer()}


def serializer(name: str, *, allow_pickle: bool = False) -> Serializer:
    """The serializer called ``name``; unknown names (and pickle, unless allowed) are refused.
    ``allow_pickle``: a cache's choice (its msgpack is the typed one, see ``typed.py``)."""
    choices = CACHE_SERIALIZERS if allow_pickle else SAFE_SERIALIZERS
    try:
        return choices[name]
    except KeyError:
        raise ValueError(f"unknown serializer {name!r}: choose one of {', '.join(choices)}") from None
