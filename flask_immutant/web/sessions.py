"""Replicated HTTP sessions: Flask-Session's Redis interface on the cluster store, made safe.

What changes from Flask-Session 0.8's ``RedisSessionInterface``:

- **Safe data.** A session is a Redis hash, one field per top-level key, each value msgpack or
  JSON. Bytes that do not decode make the request start a new session; nothing is unpickled.
- **No write per request.** The save compares each value's encoding with what was read, so an
  unchanged session is not written (a nested change is seen too, no ``session.modified = True``
  needed). Expiry still slides: the read also asks for the remaining lifetime, and the expiry is
  pushed back when it has slid by more than ``SLIDE_GRANULARITY`` of the lifetime.
- **Lost updates (opt-in).** ``IMMUTANT_SESSION_MERGE = True`` writes only the fields a request
  changed or removed (``sessions_merge.lua``), so concurrent requests changing different keys
  both keep their change. Off, a changed session is replaced whole, last writer wins.
- **No round trip for a hot session** (``IMMUTANT_SESSION_NEAR_ENTRIES``): an unchanged session
  read recently in this process is served from a near copy kept coherent by Redis client
  tracking, as the ``invalidated`` cache mode is (``near.py``, docs/sessions.md "Near cache").
- **Store down.** A request that touches its session gets a 503 and the reason is logged; a
  request that does not, is served. A circuit breaker spares later requests the timeout; the
  first call after ``RESET_AFTER`` seconds tries again, so it recovers by itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from flask import Flask, Request, Response
from flask_session.base import ServerSideSession, ServerSideSessionInterface
from flask_session.redis import RedisSessionInterface
from werkzeug.exceptions import ServiceUnavailable

from .. import lua
from ..caching.breaker import CircuitBreaker, StoreDown
from ..caching.serialization import Serializer
from ..errors import ImmutantError
from ..metrics import definitions as metrics
from ..protocols import Slot
from .near import SessionNearCache

if TYPE_CHECKING:
    from ..state import ImmutantState

log = logging.getLogger("flask_immutant.sessions")
T = TypeVar("T")

#: Session ids accepted from a cookie; anything else starts a new session (and never becomes a key).
SID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{20,128}$")
#: Fraction of the lifetime a session's expiry may slide before it is pushed back (capped at a
#: minute): refreshing it on every request would be a write on every request.
SLIDE_GRANULARITY = 0.01
SLIDE_GRANULARITY_CAP_MS = 60_000
#: Seconds a 503 tells the client to wait before retrying.
RETRY_AFTER = 1


class SessionUnavailable(ImmutantError, ServiceUnavailable):
    """The session store cannot be reached: a 503, rendered like any other HTTP error."""

    description = "The session store is unavailable right now; please try again in a moment."

    def __init__(self, reason: str = "") -> None:
        super().__init__(retry_after=RETRY_AFTER)
        self.reason = reason


class ImmutantSession(ServerSideSession):  # type: ignore[misc]  # Flask-Session is untyped
    """A server-side session that remembers the encoded fields it was loaded with."""

    def __init__(self, initial: dict[str, Any] | None = None, sid: str | None = None,
                 permanent: bool | None = None, loaded: dict[str, bytes] | None = None,
                 remaining_ms: int = -1) -> None:
        super().__init__(initial, sid=sid, permanent=permanent)
        #: Field -> encoded value as read from the store (empty for a new session).
        self.loaded: dict[str, bytes] = loaded or {}
        #: Milliseconds the stored session had left when read (-1: unknown or new).
        self.remaining_ms = remaining_ms


def _unavailable(name: str) -> Callable[..., Any]:
    def refuse(self: UnavailableSession, *args: Any, **kwargs: Any) -> Any:
        metrics.SESSION_UNAVAILABLE.inc()
        raise SessionUnavailable(self.reason)

    refuse.__name__ = name
    return refuse


class UnavailableSession(ImmutantSession):
    """Stands in for a session that could not be read: any use of it answers 503."""

    def __init__(self, sid: str, reason: str) -> None:
        super().__init__(sid=sid)
        self.reason = reason


for _name in ("__getitem__", "__setitem__", "__delitem__", "__contains__", "__iter__", "get", "setdefault", "pop",
              "popitem", "update", "clear", "keys", "values", "items", "copy"):
    setattr(UnavailableSession, _name, _unavailable(_name))
del _name


class ImmutantSessionInterface(RedisSessionInterface):  # type: ignore[misc]  # Flask-Session is untyped
    """Flask-Session's Redis interface on the cluster store; installed by the ``web`` plugin."""

    session_class = ImmutantSession

    def __init__(self, app: Flask, state: ImmutantState, *, serializer: Serializer, merge: bool,
                 breaker: CircuitBreaker, near_entries: int = 0) -> None:
        # RedisSessionInterface.__init__ wants a client now; the store is connected on first use.
        ServerSideSessionInterface.__init__(
            self, app, key_prefix="", use_signer=False,
            permanent=app.config.get("SESSION_PERMANENT", True),
            sid_length=app.config.get("SESSION_ID_LENGTH", 32),
        )
        self.state = state
        self.app_name = state.app_id or app.name
        self.serializer = serializer
        self.merge = merge
        self.breaker = breaker
        self._merge_script: Any = None
        self.near: SessionNearCache | None = None
        if near_entries:
            self.near = SessionNearCache(f"sessions-{self.app_name}", lambda: self.state.store,
                                         state.keys.session(self.app_name, ""), near_entries)

    @property
    def client(self) -> redis.Redis:
        return self.state.store

    def _get_store_id(self, sid: str) -> str:
        return self.state.keys.session(self.app_name, sid)

    def _call(self, op: Callable[[], T]) -> T:
        """``op()`` on the store; :class:`SessionUnavailable` for an outage (which opens the
        breaker) and for a failure inside the store client (logged here with its traceback)."""
        try:
            return self.breaker.call(op)
        except StoreDown as down:
            if down.client_fault:
                log.error("session store call failed in the client (%s): answering 503", down.reason,
                          exc_info=down.cause)
            raise SessionUnavailable(down.reason) from down.cause

    # --- reading --------------------------------------------------------------------------

    def open_session(self, app: Flask, request: Request) -> ImmutantSession:
        sid = request.cookies.get(self.get_cookie_name(app))
        if not sid or not SID_PATTERN.match(sid):
            return self._new_session()
        store_id = self._get_store_id(sid)
        near = self.near
        hit = None if near is None else near.lookup(store_id)
        if hit is not None:
            return self._load(sid, *hit)

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(store_id)
            pipe.pttl(store_id)
            return pipe.execute(raise_on_error=False)

        try:
            if near is None:
                fields, remaining = self._call(read)
            else:
                fields, remaining = near.fill(store_id, lambda: self._call(read))
            metrics.SESSION_READS.inc()
            if isinstance(fields, redis.ResponseError):  # the key is not a hash: garbage, not a session
                log.warning("session key %s is not a session (%s): starting a new session", store_id, fields)
                fields = {}
            fields = fields or {}
        except SessionUnavailable as exc:
            log.info("session store unavailable (%s): %s %s gets a 503 if it uses its session",
                     exc.reason, request.method, request.path)
            return UnavailableSession(sid, exc.reason)
        return self._load(sid, fields, remaining)

    def _load(self, sid: str, fields: dict[Any, bytes], remaining: int) -> ImmutantSession:
        if not fields:
            return self._new_session()  # unknown or expired: never adopt a client-chosen id
        data: dict[str, Any] = {}
        loaded: dict[str, bytes] = {}
        try:
            for field, raw in fields.items():
                key = field.decode() if isinstance(field, bytes) else field
                data[key] = self.serializer.loads(raw)
                loaded[key] = raw
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("session data is not valid %s (%s): starting a new session", self.serializer.name, exc)
            return self._new_session()
        return self.session_class(data, sid=sid, loaded=loaded, remaining_ms=remaining)

    def _new_session(self) -> ImmutantSession:
        return self.session_class(sid=self._generate_sid(self.sid_length), permanent=self.permanent)

    # Flask-Session's storage methods, for code that calls them directly.

    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None:
        fields: Any = self.client.hgetall(store_id)
        if not fields:
            return None
        try:
            return {field.decode(): self.serializer.loads(raw) for field, raw in fields.items()}
        except (ValueError, UnicodeDecodeError):
            return None

    def _delete_session(self, store_id: str) -> None:
        self.client.delete(store_id)
        self._forget(store_id)

    def close(self) -> None:
        """Stop the near cache's tracking thread (the runtime is stopping)."""
        if self.near is not None:
            self.near.close()

    # --- saving ---------------------------------------------------------------------------

    def save_session(self, app: Flask, session: ImmutantSession | None, response: Response) -> None:
        if not isinstance(session, ImmutantSession) or isinstance(session, UnavailableSession):
            return  # unread: nothing to save (None: open_session raised, and Flask answers that error)
        name, domain, path = self.get_cookie_name(app), self.get_cookie_domain(app), self.get_cookie_path(app)
        if session.accessed:
            response.vary.add("Cookie")
        store_id = self._get_store_id(session.sid)
        lifetime_ms = max(1, int(app.permanent_session_lifetime.total_seconds() * 1000))
        try:
            if not session:
                if session.loaded or session.modified:
                    if session.loaded:
                        self._call(lambda: self.client.delete(store_id))
                        self._forget(store_id)
                    response.delete_cookie(name, domain=domain, path=path)
                    response.vary.add("Cookie")
                return
            encoded = {key: self.serializer.dumps(value) for key, value in session.items()}
            changed = {key: raw for key, raw in encoded.items() if session.loaded.get(key) != raw}
            removed = [key for key in session.loaded if key not in encoded]
            wrote = False
            if changed or removed:
                wrote = self._write(store_id, session, encoded, changed, removed, lifetime_ms)
                if not wrote:
                    response.delete_cookie(name, domain=domain, path=path)
                    return
            elif self._needs_slide(app, session, lifetime_ms):
                self._call(lambda: self.client.pexpire(store_id, lifetime_ms))
                self._forget(store_id)
        except SessionUnavailable as exc:
            log.warning("session store unavailable (%s): %s not saved, answering 503", exc.reason, request_line())
            metrics.SESSION_UNAVAILABLE.inc()
            _make_503(response, exc)
            return
        if wrote or self.should_set_cookie(app, session):
            response.set_cookie(
                name, session.sid, expires=self.get_expiration_time(app, session),
                httponly=self.get_cookie_httponly(app), domain=domain, path=path,
                secure=self.get_cookie_secure(app), samesite=self.get_cookie_samesite(app),
            )
            response.vary.add("Cookie")

    def _forget(self, store_id: str) -> None:
        if self.near is not None:
            self.near.forget(store_id)

    def _needs_slide(self, app: Flask, session: ImmutantSession, lifetime_ms: int) -> bool:
        if not session.loaded or not app.config.get("SESSION_REFRESH_EACH_REQUEST", True):
            return False
        granularity = min(lifetime_ms * SLIDE_GRANULARITY, SLIDE_GRANULARITY_CAP_MS)
        return session.remaining_ms >= 0 and lifetime_ms - session.remaining_ms > granularity

    def _write(self, store_id: str, session: ImmutantSession, encoded: dict[str, bytes], changed: dict[str, bytes],
               removed: list[str], lifetime_ms: int) -> bool:
        """Store the session; False if merge mode found it ended meanwhile (the write is dropped)."""
        try:
            return self._store(store_id, session, encoded, changed, removed, lifetime_ms)
        finally:
            self._forget(store_id)

    def _store(self, store_id: str, session: ImmutantSession, encoded: dict[str, bytes], changed: dict[str, bytes],
               removed: list[str], lifetime_ms: int) -> bool:
        if self.merge:
            args: list[Any] = [lifetime_ms, "1" if session.loaded else "0", len(changed)]
            for key, raw in changed.items():
                args += [key, raw]
            args += removed

            def merge() -> Any:
                if self._merge_script is None:  # in the guard: the first use makes the store client
                    self._merge_script = lua.script(self.client, "web/sessions_merge")
                return self._merge_script(keys=[store_id], args=args)

            stored = self._call(merge)
            if not stored:
                log.info("session %s… ended while a request changed it (logout or expiry): change dropped",
                         session.sid[:6])
                return False
        else:
            def replace() -> None:
                pipe = self.client.pipeline(transaction=True)
                pipe.delete(store_id)
                pipe.hset(store_id, mapping=encoded)  # type: ignore[arg-type]  # redis-py's Mapping key is invariant
                pipe.pexpire(store_id, lifetime_ms)
                pipe.execute()

            self._call(replace)
        session.loaded = encoded
        metrics.SESSION_WRITES.inc()
        return True

    # --- security -------------------------------------------------------------------------

    def regenerate(self, session: ImmutantSession) -> None:
        """Give ``session`` a new id and drop the old one from the store (call it at login)."""
        if isinstance(session, UnavailableSession):
            raise SessionUnavailable(session.reason)
        if session.loaded:
            old = self._get_store_id(session.sid)
            self._call(lambda: self.client.delete(old))
            self._forget(old)
        session.sid = self._generate_sid(self.sid_length)
        session.loaded = {}
        session.remaining_ms = -1
        session.modified = True


def request_line() -> str:
    from flask import has_request_context, request

    return f"{request.method} {request.path}" if has_request_context() else "(no request)"


def _make_503(response: Response, exc: SessionUnavailable) -> None:
    """Turn the view's response into the 503 it has become: its session change was not saved."""
    response.status_code = 503
    response.headers["Retry-After"] = str(RETRY_AFTER)
    response.headers.pop("Set-Cookie", None)
    response.direct_passthrough = False
    response.set_data(f"503 Service Unavailable: {SessionUnavailable.description}\n")
    response.mimetype = "text/plain"


#: Where an app's session interface is kept in its state (for the status section).
SESSIONS: Slot[ImmutantSessionInterface] = Slot("sessions")
