"""flask-immutant: Immutant's clustering features for ordinary Flask apps."""

from __future__ import annotations

from .errors import ImmutantConfigError, ImmutantError, NoAppError, NodeStartError, StoreUnavailableError
from .extension import ImmutantExtension, ImmutantState, get_state
from .hookspecs import hookimpl
from .running import current
from .settings import Setting

__version__ = "0.1.0.dev0"

__all__ = [
    "ImmutantConfigError",
    "ImmutantError",
    "ImmutantExtension",
    "ImmutantState",
    "NoAppError",
    "NodeStartError",
    "Setting",
    "StoreUnavailableError",
    "__version__",
    "current",
    "get_state",
    "hookimpl",
]
