"""Messages on the wire: a JSON envelope around a JSON or msgpack body; never pickle.

The envelope is the single argument of the Dramatiq message (which Dramatiq itself encodes as
JSON). A msgpack body travels base64-encoded inside it.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

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
    data: dict[str, Any] = {"destination": destination, "published_at": round(now, 6)}
    if encoding == "json":
        data["body"] = body
    else:
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
    encoding = raw.get("encoding", "json")
    body = raw["body"]
    if encoding == "msgpack":
        try:
            body = msgpack.unpackb(base64.b64decode(body, validate=True), raw=False)
        except (TypeError, ValueError, binascii.Error, msgpack.UnpackException) as exc:
            raise MalformedMessage(f"the msgpack body cannot be decoded: {exc}") from None
    elif encoding != "json":
        raise MalformedMessage(f"unknown body encoding {encoding!r}")
    properties = raw.get("properties") or {}
    if not isinstance(properties, dict):
        raise MalformedMessage(f"properties must be an object, not {type(properties).__name__}")
    try:
        return Message(
            body=body,
            destination=raw["destination"],
            id=message_id,
            properties=properties,
            correlation_id=raw.get("correlation_id"),
            reply_to=raw.get("reply_to"),
            key=raw.get("key"),
            published_at=_number(raw.get("published_at")),
            expires_at=_number(raw.get("expires_at")),
            encoding=encoding,
            retries=retries,
            trace=_trace(raw.get("trace")),
        )
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"malformed envelope: {exc}") from None


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
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)
