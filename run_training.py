"""Run the memory pipeline: load chat sessions, extract memories, train <recall>, train memory
decoding, publish a model version (steps 0-4 of the design document).

    python run_training.py                              # embedded default model, sample chats
    python run_training.py --config configs/default.yaml --chats_dir my_chats --stage extract
    python run_training.py --memories facts.jsonl --chats_dir "" --stage recall
    python run_training.py --full true                  # retrain from the base model on every memory
    python run_training.py --daemon --config configs/default.yaml   # the retraining daemon
    python run_training.py --status --output_dir output # what the daemon/training is doing

A rerun after a crash or a SIGTERM resumes the unfinished run. Exit codes: 0 done (or
stopped cleanly at a safe point by SIGTERM/SIGINT), 1 bad input, 2 bad option, 3 another
training (or daemon) holds the lock.
"""
import os
import sys
import traceback
from pathlib import Path

from memory.chat_store import ChatFormatError
from memory.config import parse_args
from memory.sft_data import SFTFormatError
from memory.training_service import MemoryTrainingService
from recall.distributed import init_process_group, is_main, main_first, world_size
from recall.model_loading import ModelError, ModelNotFoundError


def _pop_flag(argv, flag: str) -> bool:
    found = flag in argv
    while flag in argv:
        argv.remove(flag)
    return found


def main(argv=None) -> int:
    from memory.fileio import private_umask

    with private_umask():  # what this writes is the user's alone (0600 files, 0700 directories)
        return _main(argv)


def _path_problem(chats_dir, output_dir) -> str:
    """A one-line reason the directories cannot be used, or ''. A missing chats directory is an
    error, never created: a misspelt path would otherwise read 0 sessions and succeed."""
    if chats_dir:
        chats = Path(chats_dir)
        if not chats.exists():
            return f"--chats_dir {chats}: no such directory (chat.py creates it when it saves a chat)"
        if not chats.is_dir():
            return f"--chats_dir {chats}: not a directory"
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        return f"--output_dir {out}: not a directory"
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        return f"--output_dir {out}: {parent} is not writable"
    return ""


def _main(argv=None) -> int:
    from memory.runs import (LOCK_FILE, AlreadyRunning, ProcessLock, StopRequested, install_stop_handlers,
                             restore_handlers, utc_now)
    from memory.training_scheduler import journald_logging, status_lines

    argv = list(sys.argv[1:] if argv is None else argv)
    daemon, status = _pop_flag(argv, "--daemon"), _pop_flag(argv, "--status")
    journald_logging()
    try:
        model_args, args, train_args = parse_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if status:
        print("\n".join(status_lines(Path(train_args.output_dir))))
        return 0
    problem = _path_problem(args.chats_dir, train_args.output_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if daemon:
        from memory.training_scheduler import TrainingScheduler

        return TrainingScheduler(model_args, args, train_args).serve()
    init_process_group(bool(train_args.deepspeed))  # under deepspeed/torchrun: before any barrier
    try:  # one lock per training: rank 0 takes it for all ranks of a launcher
        lock = ProcessLock(Path(train_args.output_dir) / LOCK_FILE).acquire() if is_main() else None
    except AlreadyRunning as exc:
        print(f"error: training {exc}", file=sys.stderr)
        return 3
    previous = install_stop_handlers()
    service = MemoryTrainingService(model_args, args, train_args)
    if world_size() > 1:
        with main_first():  # every rank loads here; rank 0 first (it fills the converted-model cache)
            service.loaded
    record = {"trigger": "manual", "started_at": utc_now(), "result": "failed"}
    try:
        summary = service.run_training()
        record.update(result="ok", version=summary.version)
    except (ChatFormatError, ModelNotFoundError, ModelError, SFTFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        record["error"] = str(exc)
        return 1
    except StopRequested as exc:
        print(f"{exc}; run the same command again to resume", file=sys.stderr)
        record.update(result="stopped", error=str(exc))
        return 0
    except Exception as exc:  # noqa: BLE001 - a full disk, a corrupt DB...: the traceback, then what it means
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}\n(the current version is unchanged; fix the cause and run the "
              "same command again to resume)", file=sys.stderr)
        record["error"] = f"{type(exc).__name__}: {exc}"
        return 1
    finally:
        service.close()
        service.status.update(state="idle", stage=None, progress=None, last_run={**record, "finished_at": utc_now()})
        if lock is not None:
            lock.release()
        restore_handlers(previous)
    if is_main():
        print("\n".join(summary.lines()))
        print(f"report: {summary.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
