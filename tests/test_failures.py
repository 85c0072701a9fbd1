"""Faults injected under real ``run_training.py`` processes: a full disk, a corrupt SQLite file,
a corrupt vector index, a half-written version directory, and the scheduler's clock jumping
backwards. In each, the last good version stays current, the error is clear, and the same
command succeeds once the fault is gone, with nothing lost."""
import resource
import shutil
import signal

import pytest

import run_training
from memory.publish import MANIFEST, resolve_current
from tests.test_daemon import FIRST, SECOND, _files, _flags, _run_cli, _state

@pytest.fixture
def published(tiny_model_dir, tmp_path):
    """A first version on FIRST, SECOND imported and waiting: the cycle the faults hit."""
    f = _files(tmp_path)
    out = tmp_path / "out"
    flags = _flags(tiny_model_dir, tmp_path, out)
    assert run_training.main(flags + ["--memories", str(f["first"])]) == 0
    assert run_training.main(flags + ["--memories", str(f["second"]), "--stage", "extract"]) == 0
    return out, flags, resolve_current(out / "models")


def _recovered(out, flags, before):
    done = _run_cli(["run_training.py", *flags])
    assert done.returncode == 0, done.stdout[-3000:]
    assert resolve_current(out / "models") != before
    assert _state(out)["snapshot"] == sorted(FIRST + SECOND)  # nothing lost


def _file_size_limit(limit: int):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.reliability(fault='Disk full while the cycle writes the new version (file-size limit, real process)',
                         outcome='clear error; current kept; recovered on rerun, nothing lost')
def test_disk_full_while_writing_the_version(published):
    out, flags, before = published
    import subprocess
    import sys

    from tests.test_daemon import ROOT

    done = subprocess.run([sys.executable, "run_training.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, preexec_fn=_file_size_limit(1_000_000))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "File too large" in done.stderr and "the current version is unchanged" in done.stderr
    assert resolve_current(out / "models") == before
    _recovered(out, flags, before)


@pytest.mark.reliability(fault='Corrupt SQLite memory DB (header zeroed), real process',
                         outcome='clear error naming the file; current kept; recovered once restored, nothing lost')
def test_corrupt_sqlite_file(published):
    out, flags, before = published
    db_file = out / "memory_db" / "memories.sqlite3"
    shutil.copy(db_file, db_file.with_suffix(".bak"))
    for side in ("-wal", "-shm"):
        shutil.copy(db_file.with_name(db_file.name + side), db_file.with_name(db_file.name + side + ".bak")) \
            if db_file.with_name(db_file.name + side).exists() else None
    data = bytearray(db_file.read_bytes())
    data[:100] = b"\0" * 100  # the header: no longer a database
    db_file.write_bytes(bytes(data))
    done = _run_cli(["run_training.py", *flags])
    assert done.returncode == 1
    assert f"{db_file}: cannot open memory database" in done.stdout
    assert resolve_current(out / "models") == before
    shutil.copy(db_file.with_suffix(".bak"), db_file)  # the fault is gone (restored from a backup)
    _recovered(out, flags, before)


@pytest.mark.reliability(fault='Corrupt usearch index file, real process',
                         outcome='rebuilt from SQLite with a warning naming the file; cycle completes')
def test_corrupt_vector_index_is_rebuilt(published):
    out, flags, before = published
    index = out / "memory_db" / "memories.usearch"
    index.write_bytes(b"garbage" * 100)
    done = _run_cli(["run_training.py", *flags])
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"{index}" in done.stdout and "rebuilding" in done.stdout
    assert _state(out)["snapshot"] == sorted(FIRST + SECOND)


@pytest.mark.reliability(fault='Half-written version directory (no manifest, truncated weights)',
                         outcome='never used; current kept; next cycle publishes')
def test_half_written_version_directory_is_never_used(published):
    out, flags, before = published
    junk = out / "models" / "model_29991231_235959"
    shutil.copytree(before, junk, symlinks=True)
    (junk / MANIFEST).unlink()  # killed before the manifest: not a version
    (junk / "model.safetensors").write_bytes(b"half")
    assert resolve_current(out / "models") == before
    _recovered(out, flags, before)
    assert resolve_current(out / "models") != junk


@pytest.mark.reliability(fault='Wall clock set back a day under the scheduler', outcome='jobs rescheduled from the new time', cls="daemon")
def test_scheduler_survives_the_clock_jumping_backwards(tiny_model_dir, tmp_path, monkeypatch):
    """A wall clock set back (NTP, a VM restore) must not park the daemon until the clock
    catches up with the old next-run time: it reschedules from the new time."""
    import datetime as dt

    import schedule

    from memory.config import parse_args
    from memory.training_scheduler import TrainingScheduler

    out = tmp_path / "out"
    scheduler = TrainingScheduler(*parse_args(_flags(tiny_model_dir, tmp_path, out) + [
        "--schedule_every", "1h", "--trigger_min_sessions", "0", "--trigger_min_memories", "0"]))
    scheduler.setup()
    real = dt.datetime.now()
    first = scheduler.scheduler.next_run
    assert dt.timedelta(minutes=55) < first - real <= dt.timedelta(hours=1, minutes=1)
    scheduler.tick()  # nothing due

    class Back(dt.datetime):  # the clock is set back by a day
        @classmethod
        def now(cls, tz=None):
            return real - dt.timedelta(days=1)

    monkeypatch.setattr(schedule.datetime, "datetime", Back)
    scheduler.tick()
    later = scheduler.scheduler.next_run
    assert later - Back.now() <= dt.timedelta(hours=1, minutes=1), "still waiting for the old next run"
