"""What makes a training cycle safe to interrupt: run directories with stage markers, the
OS lock that allows one training at a time, the status file, and a cooperative stop.

A run directory (``OUTPUT_DIR/runs/<run_id>/``)::

    plan.json              which memories this run trains (new + replay), written before training
    config.json            the options the run started with
    recall/                step 3.1 output (Trainer checkpoints while it runs)
    decode/                step 3.2 output; decode/model/ is the version to publish
    stages/<stage>.json    written when a stage completes (recall, decode, publish)

A run whose plan exists but whose ``stages/publish.json`` does not is *unfinished*: the next
run (manual or daemon) resumes it from its first missing stage, and inside a stage from the
newest Trainer checkpoint. ``stages/abandoned.json`` retires a run that must not be published.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from memory.faults import crash_point
from memory.fileio import atomic_write_json

logger = logging.getLogger(__name__)

PLAN = "plan.json"
STAGES = "stages"
LOCK_FILE = "training.lock"
DAEMON_LOCK_FILE = "daemon.lock"
STATUS_FILE = "status.json"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- run directories
class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    @property
    def run_id(self) -> str:
        return self.path.name

    def _marker(self, stage: str) -> Path:
        return self.path / STAGES / f"{stage}.json"

    def done(self, stage: str) -> bool:
        return self._marker(stage).is_file()

    def mark(self, stage: str, info: Optional[dict] = None) -> None:
        (self.path / STAGES).mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self._marker(stage), {"completed_at": utc_now(), **(info or {})})

    def completed(self) -> list:
        return sorted(p.stem for p in (self.path / STAGES).glob("*.json")) if (self.path / STAGES).is_dir() else []

    @property
    def plan(self) -> dict:
        return json.loads((self.path / PLAN).read_text(encoding="utf-8"))

    @classmethod
    def create(cls, path: Path, plan: dict, config: dict) -> "RunDir":
        path.mkdir(parents=True, exist_ok=False, mode=0o700)
        atomic_write_json(path / "config.json", config)
        atomic_write_json(path / PLAN, plan)  # last: a run directory without a plan is ignored
        return cls(path)

    def finished(self) -> bool:
        return self.done("publish") or self.done("abandoned")


def find_unfinished(runs_dir: Path) -> Optional[RunDir]:
    """The newest run planned for publishing (``stage`` all) that has not been published or
    abandoned; older unfinished runs are abandoned (a newer plan superseded them)."""
    if not runs_dir.is_dir():
        return None
    found = None
    for path in sorted((p for p in runs_dir.iterdir() if (p / PLAN).is_file()), reverse=True):
        run = RunDir(path)
        try:
            stage = run.plan.get("stage")
        except ValueError:
            logger.warning("%s: unreadable plan; ignoring the run", path / PLAN)
            continue
        if stage != "all" or run.finished():
            continue
        if found is None:
            found = run
        else:
            run.mark("abandoned", {"reason": f"superseded by {found.run_id}"})
    return found


# --------------------------------------------------------------------------------- locking
class AlreadyRunning(RuntimeError):
    def __init__(self, path: Path, pid: Optional[int]):
        self.path, self.pid = path, pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"already running ({who} holds {path})")


class ProcessLock:
    """An exclusive ``flock`` on ``path`` held while the context is open; the holder's pid is
    written into the file. The OS releases it when the process dies, so a crash never
    leaves a stale lock behind."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self) -> "ProcessLock":
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise AlreadyRunning(self.path, holder_pid(self.path)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ProcessLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_pid(path: Path) -> Optional[int]:
    """The pid of the process holding the lock at ``path``, or None when nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ cooperative stop
class StopRequested(Exception):
    """SIGTERM/SIGINT arrived: training stopped at a safe point (a checkpoint was saved)."""


STOP = threading.Event()


def install_stop_handlers() -> dict:
    """SIGTERM and SIGINT set ``STOP``: training saves a checkpoint at the end of the current
    step and the process exits cleanly; a second signal exits at once. Returns the previous
    handlers (for ``restore_handlers``)."""
    STOP.clear()

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        logger.warning("%s received: stopping at the next safe point", signal.Signals(signum).name)
        STOP.set()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def check_stop(where: str) -> None:
    if STOP.is_set():
        raise StopRequested(f"stopped before {where}")


class StopAtStepEnd(TrainerCallback):
    """Ends training at the end of the current optimizer step when ``STOP`` is set, after the
    Trainer saves a checkpoint (resumed on the next run)."""

    def on_step_end(self, args, state, control, **kwargs):
        if STOP.is_set():
            control.should_save = True
            control.should_training_stop = True
        return control


CHECKPOINT_COMPLETE = "checkpoint_complete.json"


class MarkCompleteCheckpoints(TrainerCallback):
    """The Trainer writes ``checkpoint-N/`` file by file; a kill in the middle leaves a partial
    one. ``on_save`` runs after the checkpoint is fully written: it adds a marker, and
    ``last_complete_checkpoint`` only resumes from marked checkpoints. Under DeepSpeed every
    rank writes its own shards, so the marker waits for all of them (a barrier).

    ``RECALL_MEMORY_CRASH_AT=<stage dir>-checkpoint`` (``recall-checkpoint``,
    ``decode-checkpoint``) kills every rank right after the first complete checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        from recall.distributed import barrier

        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        barrier()
        if state.is_world_process_zero and path.is_dir():
            atomic_write_json(path / CHECKPOINT_COMPLETE, {"global_step": state.global_step, "saved_at": utc_now()})
        barrier()
        crash_point(f"{Path(args.output_dir).name}-checkpoint")
        return control


def last_complete_checkpoint(out_dir) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``out_dir`` with the completion marker; partial ones
    (the process died while saving) are removed so the Trainer's rotation never keeps them."""
    import re
    import shutil

    from recall.distributed import is_main

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    found = []
    for p in out_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    for _, path in sorted(found, reverse=True):
        if (path / CHECKPOINT_COMPLETE).is_file():
            return str(path)
        logger.warning("%s: incomplete checkpoint (the process died while saving it); removing it", path)
        if is_main():  # one remover; every rank skips it all the same
            shutil.rmtree(path, ignore_errors=True)
    return None


def raise_if_stopped(trainer_state, where: str) -> None:
    """After ``Trainer.train`` returned: did it stop early because of ``STOP``?"""
    if STOP.is_set() and trainer_state.global_step < trainer_state.max_steps:
        raise StopRequested(f"{where} stopped at step {trainer_state.global_step}/{trainer_state.max_steps}; "
                            "checkpoint saved")


# ----------------------------------------------------------------------------- status file
class Status:
    """``OUTPUT_DIR/status.json``: what the daemon or a manual run is doing (merged updates,
    atomic writes). ``python run_training.py --status`` reads it."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / STATUS_FILE

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def update(self, **fields) -> None:
        from recall.distributed import is_main

        if not is_main():  # one writer: rank 0
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_json(self.path, {**self.read(), **fields, "updated_at": utc_now()})
        except OSError as exc:  # a read-only or full disk must not turn a status write into a crash
            logger.warning("%s: could not write status: %s", self.path, exc)


class ProgressCallback(TrainerCallback):
    """Writes ``stage`` and step progress into the status file, at most every ``every`` s."""

    def __init__(self, status: Status, stage: str, every: float = 5.0):
        self.status, self.stage, self.every = status, stage, every
        self._last = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self._last >= self.every or state.global_step >= state.max_steps:
            self._last = now
            self.status.update(stage=self.stage, progress={"step": state.global_step, "max_steps": state.max_steps,
                                                           "epoch": round(state.epoch or 0.0, 3)})
        return control
