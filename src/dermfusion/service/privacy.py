"""Patient data at rest: owner-only files and folders, the audit database's mode, and metadata reduced to what the
record needs (age in whole years). Used by the audit store and the image store (``retention``)."""
from __future__ import annotations

import math
import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """``path`` created (with its missing parents) as 0700; an existing one narrowed to 0700."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in missing:
        os.chmod(p, 0o700)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte (never world-readable, not even briefly)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd >= 0:
            os.close(fd)


def private_sqlite_file(db: str) -> None:
    """The SQLite file (patient data) readable by its owner only: its folder created 0700, the file 0600 (a broader
    mode on an existing file is narrowed). SQLite gives its journal the database's mode."""
    path = Path(db).expanduser()
    for p in [p for p in path.parents if not p.exists()][::-1]:  # only folders made here are narrowed
        p.mkdir(exist_ok=True)
        os.chmod(p, 0o700)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:  # not ours to change (another owner, a read-only mount): opening it decides what happens
        pass


def whole_years(metadata: dict | None) -> dict | None:
    """Patient metadata as stored: age in completed years (the model may see a fraction; the record need not)."""
    if isinstance(metadata, dict) and metadata.get("age") is not None:
        try:
            return {**metadata, "age": int(math.floor(float(metadata["age"])))}
        except (TypeError, ValueError):
            return {k: v for k, v in metadata.items() if k != "age"}
    return metadata
