"""Built-in plugin: the ``IMMUTANT_TRACING`` setting, checked once per app."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..errors import ImmutantConfigError
from ..hookspecs import hookimpl
from ..settings import Setting
from .config import ROW, SETTING

if TYPE_CHECKING:
    from flask import Flask

    from ..protocols import StateView


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [ROW]


@hookimpl(trylast=True)
def immutant_init_app(app: Flask, state: StateView) -> None:
    """``on`` without the API fails here, at start-up, rather than tracing nothing in silence."""
    if state.settings[SETTING] == "on" and not _api_installed():
        raise ImmutantConfigError(f"{SETTING}=on needs OpenTelemetry's API, which is not installed: "
                                  "pip install 'flask-immutant[otel]' (or set it to auto or off)")


def _api_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except ImportError:  # no "opentelemetry" package at all
        return False
