"""Names that left the public surface (issue 12) still import from where they were, with a warning.

``CircuitBreaker``, ``Serializer``, the registries, ``JobSpec`` and ``MODES`` are internals: they
live in their private modules and may change without notice. Code written against the old surface
keeps working; a ``DeprecationWarning`` names the private home.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Any


def moved_attribute(module: str, name: str, moved: dict[str, str], stacklevel: int = 3) -> object:
    """For a package's ``__getattr__``: ``moved`` maps an old public name to ``"module.attribute"``."""
    target = moved.get(name)
    if target is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    home, _, attribute = target.rpartition(".")
    warnings.warn(f"{module}.{name} is internal and no longer public: import it from {home} "
                  "(it may change without notice)", DeprecationWarning, stacklevel=stacklevel)
    return getattr(importlib.import_module(home), attribute)


def lazy_or_moved(package: str, namespace: dict[str, Any], name: str, lazy: dict[str, str],
                  moved: dict[str, str]) -> Any:
    """A package's ``__getattr__`` (PEP 562): a public name of ``lazy`` (name -> relative module) is
    imported on first use and kept in ``namespace``, so a CLI command never loads the feature's
    libraries it does not run; a submodule not imported yet (``events.log``) is imported, as it
    would have been by an eager ``__init__``; any other name is looked up in ``moved``."""
    if name in lazy:
        value = getattr(importlib.import_module(lazy[name], package), name)
        namespace[name] = value
        return value
    if name not in moved and not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
        return importlib.import_module(f"{package}.{name}")
    return moved_attribute(package, name, moved, stacklevel=4)


def lazy_dir(namespace: dict[str, Any], lazy: dict[str, str]) -> list[str]:
    """A lazy package's ``__dir__``: its names, imported yet or not."""
    return sorted({*namespace, *lazy})
