"""The tracing feature's setting: ``IMMUTANT_TRACING`` (auto, on or off)."""

from __future__ import annotations

from typing import Any

from ..settings import Setting, to_bool

FEATURE = "tracing"
SETTING = "IMMUTANT_TRACING"
MODES = ("auto", "on", "off")


def mode(value: Any) -> str:
    """``auto``, ``on`` or ``off``; booleans (and 1/0, yes/no in the environment) mean on/off."""
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()
    try:
        return "on" if to_bool(value) else "off"
    except ValueError:
        raise ValueError("auto, on or off (or a boolean)") from None


ROW = Setting(SETTING, "auto", mode, "OpenTelemetry spans and W3C trace context in messages (docs/tracing.md). "
              "auto: on when opentelemetry-api is installed (the otel extra); on: refuse to start without it; "
              "off: no spans, and flask-immutant never imports it.", "auto/on/off", env=True)
