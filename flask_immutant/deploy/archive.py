"""App archives for nodes that share no disk: pack a folder, check and unpack it safely.

An archive is a gzipped tar stored in the cluster under its sha256. Before unpacking, every
member is checked: regular files and folders only (a link could point out of the target), no
absolute path, no ``..``, and the total size under a limit. Python's own ``tarfile`` filter
("data", 3.12+) covers part of this; we check ourselves so 3.10 and 3.11 get the same rules.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from .records import DeploymentError

#: Folders and files never packed: virtualenvs, caches and version control.
EXCLUDED = frozenset({".git", ".hg", ".venv", "venv", "__pycache__", ".mypy_cache", ".pytest_cache",
                      ".ruff_cache", "node_modules", ".tox"})


def pack(root: str | os.PathLike[str], limit: int) -> tuple[bytes, str]:
    """A ``.tar.gz`` of ``root`` and its sha256; refuses to make one larger than ``limit``."""
    root = Path(root)
    buffer = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if any(part in EXCLUDED for part in relative.parts) or path.suffix == ".pyc":
                continue
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue  # links are not carried: they would point elsewhere on another machine
            if path.is_file():
                total += path.stat().st_size
                if total > limit:
                    raise DeploymentError(f"{root} is larger than IMMUTANT_ARCHIVE_LIMIT ({limit} bytes)")
            tar.add(path, arcname=relative.as_posix(), recursive=False)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def check(data: bytes, expected_sha256: str, limit: int) -> list[tarfile.TarInfo]:
    """The members of a stored archive, after checking its hash and every member; else DeploymentError."""
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DeploymentError("archive does not match its recorded sha256")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DeploymentError(f"archive is not a readable .tar.gz: {exc}") from None
    total = 0
    for member in members:
        name = PurePosixPath(member.name)
        if name.is_absolute() or member.name.startswith(("/", "\\")):
            raise DeploymentError(f"archive member {member.name!r} has an absolute path")
        if ".." in name.parts:
            raise DeploymentError(f"archive member {member.name!r} climbs out with '..'")
        if not (member.isfile() or member.isdir()):
            raise DeploymentError(f"archive member {member.name!r} is a link or device; only files and folders")
        total += member.size
        if total > limit:
            raise DeploymentError(f"archive unpacks to more than IMMUTANT_ARCHIVE_LIMIT ({limit} bytes)")
    return members


def unpack(data: bytes, expected_sha256: str, target: str | os.PathLike[str], limit: int) -> Path:
    """Check, then unpack into ``target`` (replaced atomically if it exists); returns ``target``."""
    members = check(data, expected_sha256, limit)
    target = Path(target)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in members:
            destination = (staging / member.name).resolve()
            if not destination.is_relative_to(staging.resolve()):
                raise DeploymentError(f"archive member {member.name!r} would land outside the target")
            try:
                _unpack_member(tar, member, destination)
            except OSError as exc:  # "." as a file, a file then a folder of one name...
                shutil.rmtree(staging, ignore_errors=True)
                raise DeploymentError(f"archive member {member.name!r} cannot be unpacked: "
                                      f"{exc.strerror or exc}") from None
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _unpack_member(tar: tarfile.TarFile, member: tarfile.TarInfo, destination: Path) -> None:
    if member.isdir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:
        raise OSError(f"no data for {member.name!r}")
    with source, open(destination, "wb") as out:
        shutil.copyfileobj(source, out)
    os.chmod(destination, 0o644 | (0o111 if member.mode & 0o111 else 0))
