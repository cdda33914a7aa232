"""What the traced code paths hold when tracing is off as much as when it is on (a leaf module:
the spans module and the package both import it)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping


class Sent:
    """The span of a publish, as the publisher sees it: the carrier to put in each message."""

    __slots__ = ("carrier",)

    def __init__(self) -> None:
        self.carrier: Mapping[str, str] | None = None


#: The span of a publish, a delivery, a daemon run or a job fire when tracing is off.
NO_SPAN: contextlib.nullcontext[Sent] = contextlib.nullcontext(Sent())
