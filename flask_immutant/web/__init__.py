"""Web features: replicated HTTP sessions on the cluster store (``IMMUTANT_SESSIONS = True``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..moved import lazy_dir, lazy_or_moved

if TYPE_CHECKING:
    from .sessions import ImmutantSession, ImmutantSessionInterface, SessionUnavailable

#: Imported on first use, so that loading the plugin (every CLI command does) never loads Flask-Session.
_LAZY = {"ImmutantSession": ".sessions", "ImmutantSessionInterface": ".sessions", "SessionUnavailable": ".sessions"}


def __getattr__(name: str) -> Any:
    return lazy_or_moved(__name__, globals(), name, _LAZY, {})


def __dir__() -> list[str]:
    return lazy_dir(globals(), _LAZY)


def regenerate() -> None:
    """Give the current session a new id, dropping the old one: call it when a user logs in.

    An id an attacker planted before login (session fixation) then leads nowhere.
    """
    from flask import current_app, session

    from .sessions import ImmutantSessionInterface

    interface = current_app.session_interface
    if not isinstance(interface, ImmutantSessionInterface):
        from ..state import switched_off

        raise switched_off("sessions")
    # Flask types session as the SessionMixin it proxies; the proxy is what has the method
    interface.regenerate(session._get_current_object())  # type: ignore[attr-defined]


__all__ = ["ImmutantSession", "ImmutantSessionInterface", "SessionUnavailable", "regenerate"]
