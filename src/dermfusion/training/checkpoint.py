"""Atomic checkpoints (write-then-rename) so a crash never leaves a half-written file behind.

Under torchrun only rank 0 calls these (see ``engine.FoldTrainer.run``); the other ranks wait at a barrier.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch


def save_atomic(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def write_dir_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Fill a directory through ``write(tmp_dir)`` beside ``path``, then rename it into place, so ``path`` is
    either the previous complete directory or the new complete one — never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
