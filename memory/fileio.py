"""Durable file writes shared by the memory layer."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def private_umask():
    """Files and directories created inside are the owner's alone (0600 / 0700): memories,
    chats, DB files, checkpoints and model versions hold a person's private facts. The CLI
    entry points run under it; the previous umask comes back afterwards."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a 0600 temp dotfile in the same directory + os.replace."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a 0600 temp dotfile in the same directory + os.replace."""
    data = text.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; directories cannot be opened this way on Windows."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
