"""Deployment records and their signatures.

A deployment is a JSON record in the cluster store: what to run (import path, root dir or
archive hash), where (context path) and with what settings. Every record is signed with
HMAC-SHA256 under the cluster secret, so a node runs only code a holder of the secret deployed:
anyone who can write to Redis could otherwise make every node import a module of their choosing.

The signature covers the record's name, cluster, epoch and version, and a node checks them
against where it found the record (TUF's mix-and-match and rollback protections): a record
copied under another name or into another cluster is refused, and so is one older, by
``(epoch, version)``, than one the node has run for that name (:mod:`.marks`). A deliberate
rollback (``deploy --rollback``) is a signed record with a new epoch.
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

from .. import names
from ..errors import ImmutantError
from ..private import make_private_dir
from ..records import from_json

SIGNATURE_ALGORITHM = "hmac-sha256"
#: Signed before the record, so no other signed message of the package can pass for one.
SIGNATURE_CONTEXT = b"flask-immutant deployment record v2\n"


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
    cluster: str = ""
    #: Raised by a deliberate rollback; a node orders a name's records by ``(epoch, version)``.
    epoch: int = 0

    def __post_init__(self) -> None:
        """Every record, typed by a user or read from the store, passes the same checks."""
        try:
            names.checked(names.name, self.name, "deployment name")
            object.__setattr__(self, "context_path",
                               names.checked(names.context_path, self.context_path, "context path"))
            if self.archive is not None:
                names.checked(names.sha256_hex, self.archive, "archive")
        except ValueError as exc:
            raise DeploymentError(str(exc)) from None
        if self.cluster:
            try:
                names.checked(names.name, self.cluster, "cluster")
            except ValueError as exc:
                raise DeploymentError(str(exc)) from None
        if (self.import_path is not None and not isinstance(self.import_path, str)) or not isinstance(self.root, str):
            raise DeploymentError("deployment record: 'import_path' and 'root' must be strings")
        if not isinstance(self.settings, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.settings.items()):
            raise DeploymentError("deployment record: 'settings' must map names to strings")
        for number in (self.version, self.epoch):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise DeploymentError("deployment record: 'version' and 'epoch' must be integers >= 0")

    @property
    def order(self) -> tuple[int, int]:
        """What "newer" means for a name: a rollback's new epoch outranks every older version."""
        return self.epoch, self.version

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


def _mac(secret: bytes, record: Mapping[str, Any]) -> str:
    return hmac.new(secret, SIGNATURE_CONTEXT + canonical(record), hashlib.sha256).hexdigest()


def sign(deployment: Deployment, secret: bytes) -> str:
    """The stored form: ``{"record": ..., "signature": ...}`` as JSON; the record names its cluster."""
    if not deployment.cluster:
        raise DeploymentError(f"deployment {deployment.name} names no cluster; it cannot be signed")
    record = deployment.to_dict()
    return json.dumps({"record": record, "algorithm": SIGNATURE_ALGORITHM, "signature": _mac(secret, record)})


def verify(raw: bytes | str, secret: bytes, *, name: str, cluster: str) -> Deployment:
    """The deployment in ``raw``, stored under ``name`` in ``cluster``, if its signature is valid
    under ``secret`` and it was signed for that name and cluster; else DeploymentError."""
    try:
        envelope = from_json(raw)
        record, signature = envelope["record"], envelope["signature"]
    except (ValueError, KeyError, TypeError):
        raise DeploymentError("deployment record is malformed or unsigned") from None
    if not isinstance(record, dict) or not isinstance(signature, str):
        raise DeploymentError("deployment record is malformed or unsigned")
    if not hmac.compare_digest(_mac(secret, record), signature):
        raise DeploymentError(
            f"deployment {name!r} has a bad signature: tampered with, signed with another IMMUTANT_SECRET, "
            "or by an older flask-immutant (deploy it again)"
        )
    if record.get("name") != name:
        raise DeploymentError(f"deployment {name!r} holds the signed record of {record.get('name')!r}: "
                              "a record copied under another name is refused")
    if record.get("cluster") != cluster:
        raise DeploymentError(f"deployment {name!r} was signed for cluster {record.get('cluster')!r}, "
                              f"not {cluster!r}: a record copied from another cluster is refused")
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
