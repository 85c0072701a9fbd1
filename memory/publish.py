"""Step 4: publish a trained model with its memory DB as a new version.

Layout under ``models/``::

    model_YYYYmmdd_HHMMSS/    config.json, model.safetensors, tokenizer files (plain HF:
                              AutoModelForCausalLM.from_pretrained works for ordinary chat)
                              recall_state.safetensors  memory projector (+ query projector)
                              recall_config.json        token ids, activation phrase, threshold
                              memory_db/                the DB snapshot the model was trained with
                              metrics.json
                              manifest.json             written last: a version without it is never used
    current -> model_...      switched atomically (symlink renamed over the old one)

A version is built in a hidden temp directory and renamed into place only when its
manifest is written, so an interrupted publish leaves ``current`` and every older version
untouched. Old complete versions beyond ``retention`` are deleted (never ``current``).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional

from memory.fileio import atomic_write_json
from memory.vector_db import MemoryVectorDB

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "current"
PREFIX = "model_"
FORMAT_VERSION = 1


class VersionError(FileNotFoundError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(version_dir: Path) -> bool:
    manifest = Path(version_dir) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return isinstance(data, dict) and all((Path(version_dir) / f).exists() for f in data.get("files", []))


def forget_in_version(version: Path, ids: List[int]) -> bool:
    """Erase ``ids`` from a published version's DB snapshot too (recall reads it); whether any
    was there (a snapshot older than a record does not hold it)."""
    snap = Path(version) / "memory_db"
    if not snap.is_dir():
        return False
    with MemoryVectorDB(snap) as db:
        present = [i for i in ids if _status(db, i) not in (None, "deleted")]
        if present:
            db.forget(present)
    return bool(present)


def _status(db: MemoryVectorDB, id: int) -> Optional[str]:
    try:
        return db.get(id).status
    except KeyError:
        return None


def list_versions(models_dir: Path) -> List[Path]:
    """Complete versions, oldest first."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir()
                  if p.is_dir() and not p.is_symlink() and p.name.startswith(PREFIX) and is_complete(p))


def resolve_current(models_dir: Path) -> Path:
    """The version ``current`` points to; falls back to the newest complete version when
    ``current`` is missing or broken (and says so)."""
    models_dir = Path(models_dir)
    link = models_dir / CURRENT
    if link.is_symlink() or link.exists():
        target = (models_dir / os.readlink(link)) if link.is_symlink() else link
        if is_complete(target):
            return target.resolve()
        logger.warning("%s points to %s, which is not a complete version", link, target)
    versions = list_versions(models_dir)
    if not versions:
        raise VersionError(f"{models_dir}: no published model version (no {PREFIX}*/{MANIFEST})")
    return versions[-1].resolve()


def _switch_current(models_dir: Path, name: str) -> None:
    tmp = models_dir / f".{CURRENT}.tmp.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, models_dir / CURRENT)
    _fsync_dir(models_dir)


def publish_version(models_dir: Path, write: Callable[[Path], List[str]], manifest: dict,
                    retention: int = 3, now: Optional[dt.datetime] = None) -> Path:
    """Build a version with ``write(tmp_dir) -> [relative paths written]``, add the
    manifest last, rename into place, switch ``current``, apply retention."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d_%H%M%S")
    name = f"{PREFIX}{stamp}"
    n = 1
    while (models_dir / name).exists():
        n += 1
        name = f"{PREFIX}{stamp}_{n}"
    tmp = models_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(mode=0o700)
    try:
        files = write(tmp)
        body = {"format_version": FORMAT_VERSION, "name": name,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(), "files": sorted(files), **manifest}
        atomic_write_json(tmp / MANIFEST, body)
        os.rename(tmp, models_dir / name)
        _fsync_dir(models_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _switch_current(models_dir, name)
    logger.info("published %s (current)", models_dir / name)
    prune(models_dir, retention)
    return models_dir / name


def prune(models_dir: Path, retention: int) -> List[Path]:
    """Delete complete versions beyond the newest ``retention`` (never ``current``) and
    leftovers of interrupted publishes."""
    models_dir = Path(models_dir)
    removed = []
    for leftover in models_dir.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        current = resolve_current(models_dir)
    except VersionError:
        current = None
    versions = list_versions(models_dir)
    for old in versions[: max(0, len(versions) - max(1, retention))]:
        if current is not None and old.resolve() == current:
            continue
        shutil.rmtree(old)
        removed.append(old)
        logger.info("retention: removed %s", old)
    return removed


def open_version(models_dir_or_version, *, device: str = "auto", precision: str = "auto"):
    """``(RecallModel, MemoryVectorDB of its snapshot)`` for a version directory, or for
    ``current`` when given the ``models/`` directory."""
    # imported here: loading a model needs torch and the model classes, listing versions does not
    from memory.vector_db import MemoryVectorDB
    from recall.published import RECALL_CONFIG, load_recall_model

    path = Path(models_dir_or_version)
    if not (path / MANIFEST).is_file():
        if (path / RECALL_CONFIG).is_file():
            raise FileNotFoundError(f"{path}: version has no {MANIFEST} (incomplete publish); not used")
        path = resolve_current(path)
    model = load_recall_model(path, device=device, precision=precision)
    return model, MemoryVectorDB(path / "memory_db")
