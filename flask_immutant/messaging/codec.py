"""Messages on the wire: a JSON envelope around a JSON or msgpack body; never pickle.

The envelope is the single argument of the Dramatiq message (which Dramatiq itself encodes as
JSON). A msgpack body travels base64-encoded inside it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import inf, isfinite
from typing import Any

from .errors import EncodeError, MalformedMessage, MessagingError

ENCODINGS = ("json", "msgpack")


@dataclass(frozen=True)
class Message:
    """A received message with its metadata; handlers get ``body``, and the rest through
    :func:`flask_immutant.messaging.current_message`."""

    body: Any
    destination: str
    id: str = ""
    properties: Mapping[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    reply_to: str | None = None
    key: str | None = None
    published_at: float | None = None
    expires_at: float | None = None
    encoding: str = "json"
    retries: int = 0
    #: The publisher's trace context (W3C ``traceparent``, ``tracestate``...), empty without tracing.
    trace: Mapping[str, str] = field(default_factory=dict)

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and time.time() > self.expires_at


_new_object = object.__new__


def new_id() -> str:
    """A random UUID4 as ``str(uuid.uuid4())`` gives it (the same bits from ``os.urandom``, the
    same version and variant), in a third of the time: without the ``UUID`` object, whose checks
    and formatting cost each published message about 1.4 us."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def envelope(
    destination: str,
    body: Any,
    *,
    encoding: str = "json",
    properties: Mapping[str, Any] | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    key: str | None = None,
    ttl: float | None = None,
    trace: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The envelope of one published message. JSON bodies are checked when the Dramatiq message
    is encoded (once, by :func:`check_json`); msgpack bodies here."""
    if encoding not in ENCODINGS:
        raise MessagingError(f"encoding={encoding!r} is not allowed: expected 'json' or 'msgpack'")
    now = time.time()
    # Not rounded: JSON keeps a float exactly, and round() cost every publish 0.5 us.
    data: dict[str, Any] = {"destination": destination, "published_at": now}
    if encoding == "json":
        data["body"] = body
    else:
        import msgpack  # only for msgpack bodies: `status` imports this module for its ids

        try:
            packed = msgpack.packb(body, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"cannot encode the message for {destination} as msgpack: {exc}") from None
        data["encoding"] = "msgpack"
        data["body"] = base64.b64encode(packed).decode("ascii")
    if properties:
        if not isinstance(properties, Mapping) or not all(isinstance(k, str) for k in properties):
            raise MessagingError("properties must be a mapping with string keys")
        data["properties"] = dict(properties)
    if correlation_id is not None:
        data["correlation_id"] = str(correlation_id)
    if reply_to is not None:
        data["reply_to"] = reply_to
    if key is not None:
        data["key"] = str(key)
    if ttl is not None:
        if ttl <= 0:
            raise MessagingError(f"ttl={ttl!r} is not allowed: expected a positive number of seconds")
        data["expires_at"] = round(now + ttl, 6)
    if trace:
        data["trace"] = dict(trace)
    return data


def decode(raw: Any, retries: int = 0, message_id: str = "") -> Message:
    """The message in an envelope; :class:`MalformedMessage` if it is not one of ours."""
    if not isinstance(raw, dict) or not isinstance(raw.get("destination"), str) or "body" not in raw:
        raise MalformedMessage(f"not a flask-immutant message envelope: {str(raw)[:200]!r}")
    get = raw.get
    encoding = get("encoding", "json")
    body = raw["body"]
    if encoding == "msgpack":
        import msgpack

        try:
            body = msgpack.unpackb(base64.b64decode(body, validate=True), raw=False)
        except (TypeError, ValueError, binascii.Error, msgpack.UnpackException) as exc:
            raise MalformedMessage(f"the msgpack body cannot be decoded: {exc}") from None
    elif encoding != "json":
        raise MalformedMessage(f"unknown body encoding {encoding!r}")
    properties = get("properties") or {}
    if not isinstance(properties, dict):
        raise MalformedMessage(f"properties must be an object, not {type(properties).__name__}")
    published_at, expires_at, trace = get("published_at"), get("expires_at"), get("trace")
    # The usual envelope: a float time, no expiry, no trace; anything else goes the long way.
    published = published_at if type(published_at) is float and isfinite(published_at) else _number(published_at)
    expires = None if expires_at is None else _number(expires_at)
    # A frozen dataclass's __init__ sets each field through object.__setattr__, 1.9 us a message;
    # filling the new instance's __dict__ (which the frozen guard, __setattr__, never sees) costs
    # 0.5 us and gives an equal Message. The values are those __init__ would be given.
    message: Message = _new_object(Message)
    message.__dict__.update(
        body=body,
        destination=raw["destination"],
        id=message_id,
        properties=properties,
        correlation_id=get("correlation_id"),
        reply_to=get("reply_to"),
        key=get("key"),
        published_at=published,
        expires_at=expires,
        encoding=encoding,
        retries=retries,
        trace={} if trace is None else _trace(trace),
    )
    return message


#: What is kept of a message's trace field: W3C Trace Context and Baggage, each within its
#: specification's limits (longest value, most list members). Anything else is dropped unread.
TRACE_FIELDS: dict[str, tuple[int, int]] = {"traceparent": (55, 1), "tracestate": (512, 32), "baggage": (8192, 180)}
#: W3C traceparent: version-traceid-spanid-flags, lowercase hex.
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def _trace(value: Any) -> dict[str, str]:
    """The trace context a message carries; anything malformed is dropped, never the message: a
    wrong trace field must not send a good message to the dead letters."""
    if not isinstance(value, dict):
        return {}
    kept = {}
    for key, (longest, members) in TRACE_FIELDS.items():
        text = value.get(key)
        if isinstance(text, str) and len(text) <= longest and text.count(",") < members:
            kept[key] = text
    if "traceparent" in kept and not TRACEPARENT.fullmatch(kept["traceparent"]):
        del kept["traceparent"]
    return kept


def _number(value: Any) -> float | None:
    """A time in an envelope: a finite number (JSON lets a 400-digit integer and NaN through)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedMessage(f"malformed envelope: expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = inf
    if not isfinite(number):
        raise MalformedMessage(f"malformed envelope: expected a finite time, got {str(value)[:40]}")
    return number
