"""Deployment records and their signatures.

A deployment is a JSON record in the cluster store: what to run (import path, root dir or
archive hash), where (context path) and with what settings. Every record is signed with
HMAC-SHA256 under the cluster secret, so a node runs only code a holder of the secret deployed:
anyone who can write to Redis could otherwise make every node import a module of their choosing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ImmutantError
from ..private import make_private_dir

SIGNATURE_ALGORITHM = "hmac-sha256"


class DeploymentError(ImmutantError):
    """A deployment cannot be made, or a stored one may not be run (unsigned, tampered, unsafe)."""


@dataclass(frozen=True)
class Deployment:
    name: str
    import_path: str | None
    root: str
    context_path: str = "/"
    settings: dict[str, str] = field(default_factory=dict)
    archive: str | None = None  # sha256 of the stored archive; None: read the app from ``root``
    version: int = 0
    deployed_at: float = 0.0
    deployed_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployment:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def sign(deployment: Deployment, secret: bytes) -> str:
    """The stored form: ``{"record": ..., "signature": ...}`` as JSON."""
    record = deployment.to_dict()
    signature = hmac.new(secret, canonical(record), hashlib.sha256).hexdigest()
    return json.dumps({"record": record, "algorithm": SIGNATURE_ALGORITHM, "signature": signature})


def verify(raw: bytes | str, secret: bytes) -> Deployment:
    """The deployment in ``raw`` if its signature is valid under ``secret``; else DeploymentError."""
    try:
        envelope = json.loads(raw)
        record, signature = envelope["record"], envelope["signature"]
    except (ValueError, KeyError, TypeError):
        raise DeploymentError("deployment record is malformed or unsigned") from None
    if not isinstance(record, dict) or not isinstance(signature, str):
        raise DeploymentError("deployment record is malformed or unsigned")
    expected = hmac.new(secret, canonical(record), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise DeploymentError(
            f"deployment {record.get('name')!r} has a bad signature: tampered with, or signed with "
            "another IMMUTANT_SECRET"
        )
    try:
        return Deployment.from_dict(record)
    except TypeError as exc:
        raise DeploymentError(f"deployment record is malformed: {exc}") from None


def cluster_secret(settings: Mapping[str, Any]) -> bytes:
    """``IMMUTANT_SECRET``, or on a developer's box one generated once into ``IMMUTANT_HOME``
    (mode 0600), shared by every node and command of that home."""
    configured = settings.get("IMMUTANT_SECRET")
    if configured:
        return str(configured).encode()
    path = Path(settings["IMMUTANT_HOME"]) / "secret"
    make_private_dir(path.parent)  # IMMUTANT_HOME is owner-only when we create it
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    deadline = time.monotonic() + 2.0
    while not (secret := path.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)  # another process created it a moment ago and is writing it
    if not secret:
        raise DeploymentError(f"the cluster secret file {path} is empty; delete it or set IMMUTANT_SECRET")
    return secret.encode()


def new_version(previous: Deployment | None) -> tuple[int, float]:
    return (previous.version + 1 if previous else 1), time.time()
