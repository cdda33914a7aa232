"""msgpack with typed extensions, so that what Flask-Caching stores comes back as it went in.

Plain msgpack turns a ``(body, status)`` tuple into a list (Flask then serves it as a JSON array)
and cannot encode a ``Response`` or an ``HTTPException`` at all. This codec adds one msgpack
``ExtType`` per type of a closed set: tuple, set, frozenset, ``markupsafe.Markup``, Werkzeug and
Flask responses (and Flask-Caching's ``CachedResponse``) and the HTTP exceptions of
``werkzeug.exceptions``. Decoding an extension only ever calls constructors of that set with
plain data (status, headers, body, description), never a class or a function named by the bytes:
a store writer can choose *which* value of the set comes back, as with any plain value, but
cannot make the reader run code (docs/caching.md).

Subclasses of plain types outside the set (an ``OrderedDict``, an ``IntEnum``) are stored as
their plain base value, as plain msgpack always did; anything else is a ``TypeError``.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, cast

import msgpack
import werkzeug.exceptions
from markupsafe import Markup
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

TUPLE, SET, FROZENSET, MARKUP, RESPONSE, HTTP_EXCEPTION = 1, 2, 3, 4, 5, 6

#: The HTTP exceptions a stored value may name: those Werkzeug defines, by class name.
HTTP_EXCEPTIONS: dict[str, type[HTTPException]] = {
    name: cls for name, cls in vars(werkzeug.exceptions).items()
    if inspect.isclass(cls) and issubclass(cls, HTTPException)
}
#: The attributes of an HTTP exception that travel with it (others would be lost: refused).
EXCEPTION_FIELDS = frozenset({"description", "response", "valid_methods", "retry_after", "length", "units"})
_PLAIN_BASES = (dict, list, str, bytes, int, float)
#: Values Flask changes while it serves them (headers, cookies): in-process copies of them are
#: kept encoded, so that every hit gets a fresh object and one request's cookies never reach the next.
MUTATED_BY_FLASK = (WerkzeugResponse, HTTPException, tuple)


class Encoded:
    """A value kept in process as its bytes, decoded again on every read."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _response_classes() -> dict[str, type[WerkzeugResponse]]:
    """Response classes by tag; Flask-Caching's only when it is installed."""
    import flask

    classes: dict[str, type[WerkzeugResponse]] = {"werkzeug": WerkzeugResponse, "flask": flask.Response}
    try:
        from flask_caching import CachedResponse
    except ImportError:
        pass
    else:
        classes["cached"] = CachedResponse
    return classes


_RESPONSES: dict[str, type[WerkzeugResponse]] | None = None


def response_classes() -> dict[str, type[WerkzeugResponse]]:
    global _RESPONSES
    if _RESPONSES is None:
        _RESPONSES = _response_classes()
    return _RESPONSES


def _default(value: Any) -> Any:
    kind = type(value)
    if kind is tuple:
        return msgpack.ExtType(TUPLE, packb(list(value)))
    if kind is set or kind is frozenset:
        return msgpack.ExtType(SET if kind is set else FROZENSET, packb(list(value)))
    if kind is Markup:
        return msgpack.ExtType(MARKUP, str(value).encode())
    if isinstance(value, WerkzeugResponse):
        return msgpack.ExtType(RESPONSE, packb(_response_fields(value)))
    if isinstance(value, HTTPException):
        return msgpack.ExtType(HTTP_EXCEPTION, packb(_exception_fields(value)))
    for base in _PLAIN_BASES:
        if isinstance(value, base):
            return base(value)  # type: ignore[arg-type]  # value is an instance of base, one of these
    raise TypeError(f"cannot cache a value of type {kind.__module__}.{kind.__qualname__}")


def _response_fields(response: WerkzeugResponse) -> list[Any]:
    tag = next((tag for tag, cls in response_classes().items() if type(response) is cls), None)
    if tag is None:
        kind = type(response)
        raise TypeError(f"cannot cache a response of type {kind.__module__}.{kind.__qualname__}")
    if response.direct_passthrough or response.is_streamed:
        raise TypeError("cannot cache a streamed or passthrough response (its body is not in memory)")
    timeout = getattr(response, "timeout", None) if tag == "cached" else None
    return [tag, response.status, list(response.headers.to_wsgi_list()), response.get_data(), timeout]


def _exception_fields(exc: HTTPException) -> list[Any]:
    name = type(exc).__name__
    if HTTP_EXCEPTIONS.get(name) is not type(exc):
        kind = type(exc)
        raise TypeError(f"cannot cache an exception of type {kind.__module__}.{kind.__qualname__}")
    fields = {key: value for key, value in vars(exc).items() if value is not None}
    unknown = set(fields) - EXCEPTION_FIELDS
    if unknown:
        raise TypeError(f"cannot cache {name} with its {', '.join(sorted(unknown))} (not a plain field)")
    return [name, fields]


def _ext_hook(code: int, data: bytes) -> Any:
    if code == TUPLE:
        return tuple(unpackb(data))
    if code == SET:
        return set(unpackb(data))
    if code == FROZENSET:
        return frozenset(unpackb(data))
    if code == MARKUP:
        return Markup(data.decode())
    if code == RESPONSE:
        return _response(unpackb(data))
    if code == HTTP_EXCEPTION:
        return _exception(unpackb(data))
    raise ValueError(f"unknown extension type {code}")


def _response(fields: Any) -> WerkzeugResponse:
    tag, status, headers, body, timeout = fields
    cls = response_classes().get(tag)
    if cls is None or not isinstance(body, bytes) or not isinstance(status, str):
        raise ValueError(f"not a stored response: {tag!r}")
    if cls.__name__ == "CachedResponse":
        # Flask-Caching's CachedResponse(response, timeout) is typed as the Response it subclasses
        return cls(WerkzeugResponse(body, status, [tuple(header) for header in headers]), timeout)  # type: ignore[arg-type]
    return cls(body, status, [tuple(header) for header in headers])


def _exception(fields: Any) -> HTTPException:
    name, attributes = fields
    cls = HTTP_EXCEPTIONS.get(name)
    if cls is None or not isinstance(attributes, dict) or not set(attributes) <= EXCEPTION_FIELDS:
        raise ValueError(f"not a stored HTTP exception: {name!r}")
    exc = cls.__new__(cls)
    HTTPException.__init__(exc)
    vars(exc).update(attributes)
    return exc


def packb(value: Any) -> bytes:
    packed = msgpack.packb(value, use_bin_type=True, strict_types=True, default=_default)
    return cast(bytes, packed)  # msgpack is untyped


def unpackb(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook)


class TypedMsgpackSerializer:
    """The caches' default: msgpack plus the typed extensions above."""

    name = "msgpack"

    def __init__(self) -> None:
        self._local = threading.local()

    def dumps(self, value: Any) -> bytes:
        """``packb`` on a packer of this thread (reused: no set-up per call; extensions use their own)."""
        packer = getattr(self._local, "packer", None)
        if packer is None:
            packer = self._local.packer = msgpack.Packer(use_bin_type=True, strict_types=True, default=_default)
        try:
            return cast(bytes, packer.pack(value))  # msgpack is untyped
        except BaseException:
            packer.reset()
            raise

    def loads(self, data: bytes) -> Any:
        try:
            return unpackb(data)
        except Exception as exc:  # bytes anyone with store access wrote: any failure is "not an entry"
            raise ValueError(f"not msgpack: {type(exc).__name__}: {exc}") from None
