"""Built-in plugin: replicated HTTP sessions (``IMMUTANT_SESSIONS``), settings rows and status section."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..caching.formats import SAFE_NAMES
from ..hookspecs import hookimpl
from ..settings import Setting, int_range, to_bool

if TYPE_CHECKING:
    from flask import Flask

    from ..protocols import RuntimeView
    from ..state import ImmutantState

#: The setting that turns this feature on; off, the plugin is unregistered.
FLAG = "IMMUTANT_SESSIONS"
FEATURE = "sessions"


def _serializer(value: Any) -> str:
    if value not in SAFE_NAMES:
        raise ValueError(" or ".join(repr(name) for name in SAFE_NAMES) + " (never pickle for sessions)")
    return str(value)


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [
        Setting(FLAG, False, to_bool, "Keep HTTP sessions in the cluster store, so any node serves any session "
                "(docs/sessions.md).", "bool"),
        Setting("IMMUTANT_SESSION_SERIALIZER", "msgpack", _serializer, "How session values are stored: msgpack or "
                "json.", "name"),
        Setting("IMMUTANT_SESSION_MERGE", False, to_bool, "Save only the session keys a request changed, so "
                "concurrent requests changing different keys do not lose each other's changes.", "bool"),
        Setting("IMMUTANT_SESSION_NEAR_ENTRIES", 10_000, int_range(0), "Sessions each process keeps near, "
                "coherent through Redis client tracking, so a hot unchanged session costs no store round trip; "
                "0 reads every session from the store.", "int"),
    ]


@hookimpl(trylast=True)
def immutant_init_app(app: Flask, state: ImmutantState) -> None:
    from ..caching.breaker import CircuitBreaker
    from ..caching.serialization import SAFE_SERIALIZERS
    from .sessions import SESSIONS, ImmutantSessionInterface, log  # here: CLI commands never import Flask-Session

    settings = state.settings
    interface = ImmutantSessionInterface(
        app, state,
        serializer=SAFE_SERIALIZERS[settings["IMMUTANT_SESSION_SERIALIZER"]],
        merge=settings["IMMUTANT_SESSION_MERGE"],
        breaker=CircuitBreaker("sessions", log),
        near_entries=settings["IMMUTANT_SESSION_NEAR_ENTRIES"],
    )
    app.session_interface = interface
    state.put(SESSIONS, interface)


@hookimpl(trylast=True)
def immutant_runtime_stopping(runtime: RuntimeView) -> None:
    if __package__ + ".sessions" not in sys.modules:  # then no app has sessions
        return
    from .sessions import SESSIONS

    interface = runtime.state.get(SESSIONS)
    if interface is not None:
        interface.close()


@hookimpl(trylast=True)
def immutant_status(state: ImmutantState) -> dict[str, Any]:
    if __package__ + ".sessions" not in sys.modules:  # then no app has sessions: never import Flask-Session for nothing
        return {}
    from .sessions import SESSIONS

    interface = state.get(SESSIONS)
    if interface is None:
        return {}
    return {FEATURE: {
        "app": interface.app_name,
        "serializer": interface.serializer.name,
        "merge": interface.merge,
        "breaker": interface.breaker.state,
        **(interface.near.describe() if interface.near is not None else {"near_hits": None}),
    }}
