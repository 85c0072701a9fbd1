"""The retraining daemon: ``python run_training.py --daemon`` (see deploy/recall-memory.service).

Triggers (``schedule`` library):

- periodic: every ``schedule_every`` (``30m``, ``6h``, ``1d`` ...; day periods at
  ``schedule_at``), a cycle runs when anything waits: new or changed sessions, new
  memories, a forgotten memory still in the weights, or an unfinished run;
- threshold: every ``check_interval_minutes``, a cycle runs as soon as at least
  ``trigger_min_sessions`` sessions or ``trigger_min_memories`` memories wait;
- startup: one periodic-style check at once (catches up after downtime, resumes a crash).

One training at a time: the daemon holds ``OUTPUT_DIR/daemon.lock`` for its lifetime (a
second daemon exits 3 with "already running (pid N)"), and every cycle, like every manual
``run_training.py``, holds ``OUTPUT_DIR/training.lock``. SIGTERM/SIGINT stop training at the
end of the current step, after a checkpoint, and the daemon exits 0; the next start
resumes. A failed cycle is logged, leaves ``current`` as it was, and is retried at the
next trigger.
"""
from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from memory.config import parse_every
from memory.runs import (DAEMON_LOCK_FILE, LOCK_FILE, STOP, AlreadyRunning, ProcessLock, Status, StopRequested,
                         holder_pid, install_stop_handlers, restore_handlers, utc_now)

logger = logging.getLogger(__name__)


class TrainingScheduler:
    def __init__(self, model_args, args, train_args):
        import schedule

        self.model_args, self.args, self.train_args = model_args, args, train_args
        self.output_dir = Path(train_args.output_dir)
        self.status = Status(self.output_dir)
        self.scheduler = schedule.Scheduler()
        self.failures = 0

    # ----------------------------------------------------------------- checks
    def _service(self):
        from memory.training_service import MemoryTrainingService

        return MemoryTrainingService(self.model_args, self.args, self.train_args)

    def waiting(self) -> dict:
        service = self._service()
        try:
            return service.waiting()
        finally:
            service.close()

    def check(self, trigger: str) -> Optional[bool]:
        """Run a cycle if ``trigger``'s condition holds; True/False: the cycle's outcome,
        None: nothing to do."""
        try:
            w = self.waiting()
        except Exception:  # noqa: BLE001 - an unreadable store must not kill the daemon
            logger.exception("%s check failed", trigger)
            return False
        if trigger == "threshold":
            due = ((self.args.trigger_min_sessions > 0 and w["sessions"] >= self.args.trigger_min_sessions)
                   or (self.args.trigger_min_memories > 0 and w["memories"] >= self.args.trigger_min_memories)
                   or w["unfinished_run"])
        else:
            due = any(w.values())
        self.status.update(waiting=w, next_run=self.next_run())
        if not due:
            logger.info("%s check: nothing to do (%s)", trigger, _describe(w))
            return None
        logger.info("%s check: starting a cycle (%s)", trigger, _describe(w))
        return self.run_cycle(trigger)

    def run_cycle(self, trigger: str) -> bool:
        """One training cycle under the training lock; never raises except StopRequested."""
        started = time.perf_counter()
        record = {"trigger": trigger, "started_at": utc_now()}
        try:
            with ProcessLock(self.output_dir / LOCK_FILE):
                self.status.update(state="training", pid=os.getpid(), stage="start", progress=None)
                service = self._service()
                try:
                    summary = service.run_training("all")
                finally:
                    service.close()
                    del service
                    gc.collect()
            record.update(result="ok", version=summary.version, plan=summary.plan,
                          seconds=round(time.perf_counter() - started, 1))
            for line in summary.lines():
                logger.info("cycle: %s", line)
            self.failures = 0
            return True
        except AlreadyRunning as exc:
            logger.warning("cycle skipped: training %s", exc)
            record.update(result="skipped", error=str(exc))
            return False
        except StopRequested as exc:
            record.update(result="stopped", error=str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - keep the daemon alive; current stays as it was
            self.failures += 1
            logger.exception("cycle failed (%d in a row); the published version is unchanged, retrying at the "
                             "next trigger", self.failures)
            record.update(result="failed", error=f"{type(exc).__name__}: {exc}")
            return False
        finally:
            record["finished_at"] = utc_now()
            self.status.update(state="idle", stage=None, progress=None, last_run=record, next_run=self.next_run())

    # ------------------------------------------------------------------ loop
    def next_run(self) -> Optional[str]:
        when = self.scheduler.next_run if self.scheduler.jobs else None
        return when.astimezone().isoformat(timespec="seconds") if when else None

    def tick(self) -> None:
        """One pass of the loop: run what is due. A wall clock set backwards (NTP, a restored VM)
        would leave the jobs waiting for their old next-run times, possibly for days: when the
        clock is seen going back by more than a minute, the jobs are planned again from now."""
        now = dt.datetime.now()
        last, self._last_tick = getattr(self, "_last_tick", None), now
        if last is not None and now < last - dt.timedelta(minutes=1):
            logger.warning("the clock went back by %s; rescheduling from now", last - now)
            self.scheduler.clear()
            self.setup()
            self.status.update(next_run=self.next_run())
        self.scheduler.run_pending()

    def setup(self) -> None:
        amount, unit = parse_every(self.args.schedule_every)
        if unit == "days":
            every = self.scheduler.every(int(amount)).days.at(self.args.schedule_at)
        elif unit == "hours":
            every = self.scheduler.every(amount * 60).minutes
        else:
            every = self.scheduler.every(amount * 60).seconds
        every.do(self.check, "periodic")
        if self.args.trigger_min_sessions > 0 or self.args.trigger_min_memories > 0:
            self.scheduler.every(self.args.check_interval_minutes * 60).seconds.do(self.check, "threshold")

    def serve(self, max_cycles: Optional[int] = None) -> int:
        """The daemon's main loop; returns the process exit code."""
        try:
            lock = ProcessLock(self.output_dir / DAEMON_LOCK_FILE).acquire()
        except AlreadyRunning as exc:
            logger.error("daemon %s", exc)
            return 3
        previous = install_stop_handlers()
        try:
            self.setup()
            self.status.update(state="idle", daemon_pid=os.getpid(), daemon_started_at=utc_now(),
                               schedule={"every": self.args.schedule_every, "at": self.args.schedule_at,
                                         "min_sessions": self.args.trigger_min_sessions,
                                         "min_memories": self.args.trigger_min_memories},
                               next_run=self.next_run())
            logger.info("daemon started (pid %d); output %s; every %s; next periodic run %s", os.getpid(),
                        self.output_dir, self.args.schedule_every, self.next_run())
            self.check("startup")
            while not STOP.is_set():
                self.tick()
                idle = self.scheduler.idle_seconds
                STOP.wait(timeout=max(0.2, min(idle if idle is not None else 5.0, 5.0)))
        except StopRequested as exc:
            logger.warning("%s; exiting (the next start resumes)", exc)
        finally:
            self.status.update(state="stopped", stage=None, progress=None, daemon_pid=None, next_run=None)
            lock.release()
            restore_handlers(previous)
        logger.info("daemon stopped")
        return 0


def _describe(w: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in w.items())


def status_lines(output_dir: Path) -> list:
    """``run_training.py --status``: what the daemon/training is doing, from the status file
    and the locks (a status left by a killed process is reported as such)."""
    output_dir = Path(output_dir)
    data = Status(output_dir).read()
    trainer, daemon = holder_pid(output_dir / LOCK_FILE), holder_pid(output_dir / DAEMON_LOCK_FILE)
    lines = [f"output: {output_dir}"]
    lines.append(f"daemon: running (pid {daemon})" if daemon else "daemon: not running")
    if trainer:
        progress = data.get("progress") or {}
        step = f", step {progress['step']}/{progress['max_steps']}" if "step" in progress else ""
        lines.append(f"state: training (pid {trainer}), stage {data.get('stage') or '?'}{step}; "
                     f"run {data.get('run_dir') or '-'}")
    else:
        note = " (the last training process died: the next run resumes it)" if data.get("state") == "training" else ""
        lines.append(f"state: idle{note}")
    last = data.get("last_run")
    if last:
        lines.append(f"last run: {last.get('result')} ({last.get('trigger')}), finished {last.get('finished_at')}"
                     + (f", version {Path(last['version']).name}" if last.get("version") else "")
                     + (f", error: {last['error']}" if last.get("error") else ""))
    else:
        lines.append("last run: none recorded")
    lines.append(f"next run: {data.get('next_run') or '-'}")
    if data.get("waiting"):
        lines.append(f"waiting: {_describe(data['waiting'])} (at {data.get('updated_at')})")
    return lines


def journald_logging(level=logging.INFO) -> None:
    """Log lines for stdout: under systemd (``JOURNAL_STREAM`` set) without our own
    timestamp, with ``<N>`` syslog priority prefixes journald understands."""
    if os.environ.get("JOURNAL_STREAM"):
        priorities = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

        class Journald(logging.Formatter):
            def format(self, record):
                return f"<{priorities.get(record.levelno, 6)}>{super().format(record)}"

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(Journald("%(name)s: %(message)s"))
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stdout)

