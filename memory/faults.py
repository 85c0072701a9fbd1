"""Fault injection for the reliability tests and ``bench.fault_injection``.

``RECALL_MEMORY_CRASH_AT=<name>`` makes the process SIGKILL itself at the named point
(``crash_point``): no cleanup runs, exactly like ``kill -9`` or a power cut.
``RECALL_MEMORY_CRASH_AT=commit:N`` does the same right after the Nth SQLite transaction this
process commits to a memory DB (``after_commit``, called by ``MemoryVectorDB``). Every state
that a crash can leave on disk is "the first N transactions committed", so trying each N covers
every point a ``kill -9`` can land on. A process that exits normally before the Nth commit
prints how many it made, on stderr.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)
CRASH_ENV = "RECALL_MEMORY_CRASH_AT"
_commits = 0
_lock = threading.Lock()


def _die(why: str) -> None:
    logger.warning("%s=%s: killing this process", CRASH_ENV, why)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(name: str) -> None:
    """SIGKILL this process here when ``RECALL_MEMORY_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        _die(name)


def after_commit() -> None:
    """Count a committed DB transaction; SIGKILL after the Nth when asked (``commit:N``)."""
    global _commits
    spec = os.environ.get(CRASH_ENV, "")
    if not spec.startswith("commit:"):
        return
    with _lock:
        _commits += 1
        if _commits == 1:
            atexit.register(_report_unreached, spec)
        if _commits == int(spec.split(":", 1)[1]):
            _die(spec)


def _report_unreached(spec: str) -> None:
    """At a normal exit: how many commits there were (bench.fault_injection reads this line)."""
    # print, not logging: the run's log handlers may go to stdout or be closed by now, and the
    # benchmark reads this line from stderr
    print(f"{CRASH_ENV}={spec} not reached: {_commits} commits", file=sys.stderr, flush=True)
