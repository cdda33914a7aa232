"""The exceptions flask-immutant raises on purpose."""

from __future__ import annotations


class ImmutantError(Exception):
    """Base class: a condition a user can act on, reported as one line by the CLI."""


class ImmutantConfigError(ImmutantError, ValueError):
    """An ``IMMUTANT_*`` setting is unknown or has a value that is not allowed."""


class StoreUnavailableError(ImmutantError):
    """The cluster store (Redis) cannot be reached or started."""


class NodeStartError(ImmutantError):
    """A node cannot start: its name is taken, its port is busy, and so on."""


class NoAppError(ImmutantError, RuntimeError):
    """A call that acts on an app found none: no ``app=``, no app context, or no extension on it."""
