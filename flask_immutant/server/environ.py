"""The deployment environment: what the node's supervisor tells an app runtime about the
deployment it serves, written and read here only.

A runtime learns its node and store from the ``IMMUTANT_*`` variables (the node's settings); a
runtime started for a deployment also gets :data:`DEPLOYMENT_ENV`, a JSON object with the
deployment's name, version, context path, settings and config. The node's own ``--app`` runtime
has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: The environment variable holding the deployment, as JSON.
DEPLOYMENT_ENV = "_IMMUTANT_DEPLOYMENT"


@dataclass(frozen=True)
class DeploymentEnviron:
    """The deployment a runtime serves; all defaults for a runtime outside any deployment."""

    name: str | None = None
    version: int | None = None
    context_path: str = "/"
    #: ``IMMUTANT_*`` settings given with ``deploy --set``: they override the app's config.
    settings: dict[str, str] = field(default_factory=dict)
    #: Other ``--set`` values, decoded from JSON where they are JSON: put into ``app.config``.
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> DeploymentEnviron:
        """The deployment of this process (from ``environ``, default ``os.environ``)."""
        raw = (os.environ if environ is None else environ).get(DEPLOYMENT_ENV) or "{}"
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"{DEPLOYMENT_ENV} must hold a JSON object, not {raw[:40]!r}")
        known = {k: data[k] for k in ("name", "version", "context_path", "settings", "config") if k in data}
        return cls(**known)

    @classmethod
    def of(cls, name: str, version: int, context_path: str, sets: Mapping[str, str]) -> DeploymentEnviron:
        """A deployment's environment from its ``--set`` pairs: ``IMMUTANT_*`` ones are settings,
        the rest config (``--set DEBUG=true`` sets ``True``, ``N=3`` sets ``3``, else a string)."""
        return cls(name=name, version=version, context_path=context_path,
                   settings={k: v for k, v in sets.items() if k.startswith("IMMUTANT_")},
                   config={k: _config_value(v) for k, v in sets.items() if not k.startswith("IMMUTANT_")})

    def environ(self) -> dict[str, str]:
        """The variables that pass this deployment to a runtime."""
        return {DEPLOYMENT_ENV: json.dumps(asdict(self))}


def _config_value(raw: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
