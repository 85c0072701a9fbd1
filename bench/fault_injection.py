"""Fault injection: kill -9 during a run, run again, and compare with an uninterrupted run.

    python -m bench.fault_injection [--runs 20] [--seed 0] [--json FILE] [-- RUN_TRAINING_FLAGS]

The run is steps 0-2 (``run_training.py --stage extract``: read the sessions, extract, store)
on the development chats (``examples/chats`` and ``examples/dev/chats``, 28 sessions) with the
default model, unless flags after ``--`` say otherwise. First an uninterrupted reference run;
then, ``--runs`` times, a fresh output directory where the run is killed with SIGKILL and run
again to completion. Half of the kill points are random times in the reference run's wall
time (a real ``kill -9`` from outside, landing anywhere: loading, extracting, storing, saving
the index); the other half are random DB commits (``RECALL_MEMORY_CRASH_AT=commit:N``: the
process kills itself right after its Nth committed transaction, the states a crash can leave
on disk). The DB after the rerun is compared with the reference: every memory row (text,
status, ``superseded_by``, provenance, subject, vector bytes; not the wall-clock timestamps),
the processed-session marks, the tombstones and the keys of the vector index. Prints
"N runs, K differences".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from memory.faults import CRASH_ENV  # noqa: E402
from memory.vector_db import DB_FILENAME, MemoryVectorDB  # noqa: E402

CHATS = ("examples/chats", "examples/dev/chats")
_IGNORED = ("created_at", "updated_at", "processed_at", "forgotten_at")


def gather_chats(folders, dest: Path) -> int:
    """Copy the session files of ``folders`` into ``dest`` (prefixed, so names never clash)."""
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, folder in enumerate(folders):
        for f in sorted(Path(folder).glob("*.json")):
            shutil.copy(f, dest / f"{i}-{f.name}")
            n += 1
    return n


def db_state(db_dir: Path) -> dict:
    """What must equal the uninterrupted run: all rows of the DB (the vector as its hash,
    wall-clock columns left out) and, after opening it as the project does, the index keys."""
    conn = sqlite3.connect(f"file:{db_dir / DB_FILENAME}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    state = {}
    try:
        for table in ("memories", "processed_sessions", "forgotten"):
            rows = []
            for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid"):
                row = {k: r[k] for k in r.keys() if k not in _IGNORED}
                if "vector" in row:
                    row["vector"] = None if row["vector"] is None else hashlib.sha256(row["vector"]).hexdigest()
                rows.append(row)
            state[table] = rows
    finally:
        conn.close()
    with MemoryVectorDB(db_dir) as db:
        state["index_keys"] = sorted(int(k) for k in db._index.keys) if db._index is not None else []
    return state


def differences(a: dict, b: dict) -> list:
    """Human-readable differences between two db_state results (empty when equal)."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if isinstance(x, list) and isinstance(y, list):
            out.append(f"{key}: {len(x)} rows vs {len(y)}; first differing: "
                       f"{next((p for p in zip(x, y) if p[0] != p[1]), None)}")
        else:
            out.append(f"{key}: {x!r} vs {y!r}")
    return out


def run(cmd: list, env: dict, kill_after: float | None = None, timeout: float = 1800) -> tuple:
    """Run ``cmd``; with ``kill_after``, SIGKILL it that many seconds in. Returns (rc, stderr tail, seconds)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            proc.wait(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                proc.kill()
                raise
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        err.seek(0)
        tail = err.read()[-20000:].decode("utf-8", "replace")
    return proc.returncode, tail, time.perf_counter() - start


def pipeline(chats: Path, out: Path, flags: list) -> list:
    return [sys.executable, "run_training.py", "--chats_dir", str(chats), "--output_dir", str(out),
            "--stage", "extract", *flags]


def reference(chats: Path, work: Path, flags: list, env: dict) -> dict:
    """The uninterrupted run: its state, wall time and number of DB commits."""
    out = work / "reference"
    rc, err, seconds = run(pipeline(chats, out, flags), {**env, CRASH_ENV: "commit:999999999"})
    if rc != 0:
        raise SystemExit(f"the reference run failed (rc {rc}):\n{err[-3000:]}")
    found = re.search(r"not reached: (\d+) commits", err)
    if not found:
        raise SystemExit("the reference run did not report its commits:\n" + err[-2000:])
    return {"state": db_state(out / "memory_db"), "seconds": seconds, "commits": int(found.group(1))}


def one_run(i: int, point: tuple, chats: Path, work: Path, flags: list, env: dict, ref: dict) -> dict:
    kind, value = point
    out = work / f"run{i}"
    cmd = pipeline(chats, out, flags)
    if kind == "time":
        rc, _, _ = run(cmd, env, kill_after=value)
    else:
        rc, _, _ = run(cmd, {**env, CRASH_ENV: f"commit:{value}"})
    killed = rc == -signal.SIGKILL
    stored = 0
    if (out / "memory_db" / DB_FILENAME).is_file():
        conn = sqlite3.connect(f"file:{out / 'memory_db' / DB_FILENAME}?mode=ro", uri=True)
        try:
            stored = conn.execute("SELECT COUNT(*) FROM memories").fetchone()[0]
        except sqlite3.DatabaseError:
            stored = -1
        finally:
            conn.close()
    rc2, err2, _ = run(cmd, env)
    if rc2 != 0:
        return {"run": i, "kind": kind, "point": value, "killed": killed, "rows_at_kill": stored,
                "rerun_rc": rc2, "differences": [f"rerun failed: {err2[-500:]}"]}
    diff = differences(ref["state"], db_state(out / "memory_db"))
    shutil.rmtree(out, ignore_errors=True)
    return {"run": i, "kind": kind, "point": value, "killed": killed, "rows_at_kill": stored,
            "rerun_rc": rc2, "differences": diff}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m bench.fault_injection " + " ".join(argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chats", default=",".join(CHATS), help="comma-separated session folders")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs: expected at least 1")
    rng = random.Random(args.seed)
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    with tempfile.TemporaryDirectory(prefix="fault-injection-") as tmp:
        work = Path(tmp)
        n_sessions = gather_chats(args.chats.split(","), work / "chats")
        ref = reference(work / "chats", work, flags, env)
        n_rows = len(ref["state"]["memories"])
        print(f"reference: {n_sessions} sessions, {n_rows} memory rows, {ref['commits']} commits, "
              f"{ref['seconds']:.1f} s", flush=True)
        points = [("time", round(rng.uniform(0.0, ref["seconds"]), 2)) if i % 2 == 0 else
                  ("commit", rng.randint(1, ref["commits"])) for i in range(args.runs)]
        results = []
        for i, point in enumerate(points):
            r = one_run(i, point, work / "chats", work, flags, env, ref)
            results.append(r)
            print(f"run {i}: kill at {r['kind']} {r['point']}: killed={r['killed']} rows at kill {r['rows_at_kill']}; "
                  f"after rerun {'equal' if not r['differences'] else 'DIFFERENT: ' + '; '.join(r['differences'])}",
                  flush=True)
    bad = sum(bool(r["differences"]) for r in results)
    killed = sum(r["killed"] for r in results)
    print(f"{len(results)} runs ({killed} killed mid-run), {bad} differences")
    if args.json:
        body = {"command": command,
                "sessions": n_sessions, "reference_rows": n_rows, "reference_commits": ref["commits"],
                "reference_seconds": round(ref["seconds"], 1), "runs": len(results), "killed": killed,
                "differences": bad, "flags": flags, "results": results,
                "date": time.strftime("%Y-%m-%d")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(body, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
