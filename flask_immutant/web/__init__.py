"""Web features: replicated HTTP sessions on the cluster store (``IMMUTANT_SESSIONS = True``)."""

from __future__ import annotations

from .sessions import ImmutantSession, ImmutantSessionInterface, SessionUnavailable


def regenerate() -> None:
    """Give the current session a new id, dropping the old one: call it when a user logs in.

    An id an attacker planted before login (session fixation) then leads nowhere.
    """
    from flask import current_app, session

    interface = current_app.session_interface
    if not isinstance(interface, ImmutantSessionInterface):
        from ..extension import switched_off

        raise switched_off("sessions")
    # Flask types session as the SessionMixin it proxies; the proxy is what has the method
    interface.regenerate(session._get_current_object())  # type: ignore[attr-defined]


__all__ = ["ImmutantSession", "ImmutantSessionInterface", "SessionUnavailable", "regenerate"]
