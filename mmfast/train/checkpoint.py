"""Checkpoints written atomically and read back with torch.load(weights_only=True): a crash while
saving leaves the previous checkpoint whole, and loading runs no pickled code."""
from __future__ import annotations

import os
import tempfile

import torch


def save(state: dict, path: str) -> None:
    """Writes to a temporary file in path's folder, fsyncs it, renames it over path, fsyncs the
    folder (so the rename itself survives a power cut)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    return torch.load(path, map_location=map_location, weights_only=True)
