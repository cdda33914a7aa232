"""Reading records from the store without trusting them: the one place a listing skips a bad one.

Anyone who can write the store can leave garbage in it (a hash field that is not UTF-8, a value
that is not JSON, JSON of the wrong shape). Every listing reads through :func:`read_records` or
:func:`parsed_json`: a bad record is skipped, named in a warning, and the rest are shown. Warnings
go to the log and to whoever is collecting them (:func:`collecting`): the CLI prints them on
stderr, the status document and the console's status API carry them in ``warnings``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import redis

log = logging.getLogger("flask_immutant.records")

T = TypeVar("T")

#: What a parser may raise on a malformed record (anything else is a bug, and is not hidden). A
#: key of the wrong Redis type (WRONGTYPE) is malformed data too; an outage is not, and propagates.
MALFORMED = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, redis.ResponseError)

_collector: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("immutant_warnings", default=None)


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """Collect the warnings of the records read inside the block (nested blocks share the outer list)."""
    outer = _collector.get()
    if outer is not None:
        yield outer
        return
    found: list[str] = []
    token = _collector.set(found)
    try:
        yield found
    finally:
        _collector.reset(token)


#: Distinct warnings logged at WARNING level per process; repeats (a loop reading the same bad
#: record every second) go to DEBUG, so garbage in the store cannot flood the log.
LOGGED_ONCE_LIMIT = 1000
_logged: set[str] = set()


def warn(message: str) -> None:
    """A record was skipped: tell the collector if there is one (it reports it), else log it
    (once per process at WARNING)."""
    found = _collector.get()
    if found is not None:
        if message not in found:
            found.append(message)
        return
    if message in _logged or len(_logged) >= LOGGED_ONCE_LIMIT:
        log.debug("%s", message)
        return
    _logged.add(message)
    log.warning("%s", message)


def decoded(raw: bytes | str | None) -> str | None:
    """``raw`` as text, or ``None`` if it is not UTF-8."""
    if raw is None or isinstance(raw, str):
        return raw
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def shown(raw: bytes | str) -> str:
    """A name safe to print in a warning, whatever bytes it holds."""
    return repr(raw[:80]) + ("…" if len(raw) > 80 else "")


def parsed_json(raw: bytes | str | None, family: str, name: str, shape: type[T]) -> T | None:
    """``raw`` parsed as JSON of type ``shape``; ``None`` (with a warning) if it is anything else."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, TypeError) as exc:
        warn(f"skipped the {family} record {shown(name)}: not JSON ({exc})")
        return None
    if not isinstance(value, shape):
        warn(f"skipped the {family} record {shown(name)}: expected a JSON {shape.__name__}, "
             f"got {type(value).__name__}")
        return None
    return value


def hash_of(store: redis.Redis, key: str, family: str) -> dict[Any, Any]:
    """HGETALL ``key``; a key of another Redis type is garbage: empty, with a warning."""
    try:
        return store.hgetall(key)
    except redis.ResponseError as exc:
        warn(f"skipped every {family} record: {key} is not a hash ({exc})")
        return {}


def set_of(store: redis.Redis, key: str, family: str) -> list[str]:
    """SMEMBERS ``key`` as text; members that are not UTF-8, or a key of another type, are skipped."""
    try:
        raw: Any = store.smembers(key)
    except redis.ResponseError as exc:
        warn(f"skipped every {family}: {key} is not a set ({exc})")
        return []
    found = []
    for member in raw:
        text = decoded(member)
        if text is None:
            warn(f"skipped a {family} whose name is not UTF-8: {shown(member)}")
        else:
            found.append(text)
    return sorted(found)


def read_records(raw: Mapping[Any, Any], family: str, parse: Callable[[str, Any], T]) -> dict[str, T]:
    """The records of a hash read with HGETALL, by name, each through ``parse(name, raw_value)``;
    a name that is not UTF-8 or a value ``parse`` refuses (raising one of :data:`MALFORMED`)
    is skipped with a warning naming it."""
    found: dict[str, T] = {}
    for raw_name, value in raw.items():
        name = decoded(raw_name)
        if name is None:
            warn(f"skipped a {family} record whose name is not UTF-8: {shown(raw_name)}")
            continue
        try:
            found[name] = parse(name, value)
        except MALFORMED as exc:
            warn(f"skipped the {family} record {shown(name)}: {type(exc).__name__}: {exc}")
    return found


def json_object(name: str, raw: Any) -> dict[str, Any]:
    """A parser for :func:`read_records`: the value must be a JSON object."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def check_types(data: Mapping[str, Any], types: Mapping[str, type | tuple[type, ...]]) -> None:
    """Raise TypeError unless each field of ``types`` present in ``data`` has its type (a bool
    is not taken for a number, and a float field takes an int); the caller decides what is required."""
    for name, kind in types.items():
        if name not in data:
            continue
        value = data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds:
            kinds = (*kinds, int)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise TypeError(f"{name!r} is a {type(value).__name__}, not a {' or '.join(k.__name__ for k in kinds)}")


def required(data: Mapping[str, Any], types: Mapping[str, type | tuple[type, ...]]) -> None:
    """Like :func:`check_types`, and every field of ``types`` must be present."""
    missing = [name for name in types if name not in data]
    if missing:
        raise KeyError(f"missing {', '.join(missing)}")
    check_types(data, types)
