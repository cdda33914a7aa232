"""Names that left the public surface (issue 12) still import from where they were, with a warning.

``CircuitBreaker``, ``Serializer``, the registries, ``JobSpec`` and ``MODES`` are internals: they
live in their private modules and may change without notice. Code written against the old surface
keeps working; a ``DeprecationWarning`` names the private home.
"""

from __future__ import annotations

import importlib
import warnings


def moved_attribute(module: str, name: str, moved: dict[str, str]) -> object:
    """For a package's ``__getattr__``: ``moved`` maps an old public name to ``"module.attribute"``."""
    target = moved.get(name)
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    home, _, attribute = target.rpartition(".")
    warnings.warn(f"{module}.{name} is internal and no longer public: import it from {home} "
                  "(it may change without notice)", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(home), attribute)
