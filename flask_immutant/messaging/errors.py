"""Exceptions of the messaging feature."""

from __future__ import annotations

from ..errors import ImmutantError


class MessagingError(ImmutantError):
    """A destination, message or option is not acceptable (a user's mistake, said in one line)."""


class EncodeError(MessagingError, TypeError):
    """A message cannot be encoded with the chosen encoding: raised by ``publish``."""


class MalformedMessage(MessagingError):
    """A received message cannot be decoded: it goes to the dead-letter queue without retries."""


class RequestTimeout(MessagingError, TimeoutError):
    """No response arrived for a ``request`` within its timeout."""


class RemoteError(MessagingError):
    """The responder of a ``request`` raised; the message says what it raised."""
