"""Load: 10,000 chat sessions in the store and 100,000 memories in the DB.

    python -m bench.load                          # 10k sessions, 100k memories (about 5 minutes here)
    python -m bench.load --sessions 1000 --memories 10000 --sizes 1000,10000   # quick

Steps 0-1 (reading the chat store, finding new or changed sessions) and the DB operations the
pipeline and the daemon run (add, filtered search, listing, counting, forget, the daemon's
"what is waiting" check), timed at each size in ``--sizes`` so the growth is visible, with the
process's peak RSS. Vectors are random unit vectors of the default chat encoder's width (576);
texts are generated. Results: ``bench/results/load.json`` and a table.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeat: int = 1):
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return out, times


def bench_store(tmp: Path, sizes) -> list:
    from memory.chat_store import ChatStore
    from memory.vector_db import MemoryVectorDB

    rows = []
    chats = tmp / "chats"
    written = 0
    for n in sizes:
        write_sessions_range(chats, written, n)
        written = n
        store = ChatStore(chats)
        result, (seconds,) = _timed(store.load_sessions)
        with MemoryVectorDB(tmp / f"db-sessions-{n}") as db:  # bookkeeping: which are new or changed
            _, (mark,) = _timed(lambda: [db.mark_session_processed(s.session_id, s.content_hash(), "", 1)
                                         for s in result.sessions])
            _, (pending,) = _timed(lambda: [s for s in result.sessions
                                            if db.session_state(s.session_id) != s.content_hash()])
        rows.append({"sessions": n, "load_s": round(seconds, 2), "per_session_ms": round(1000 * seconds / n, 3),
                     "mark_processed_s": round(mark, 2), "find_new_s": round(pending, 3), "rss_mib": round(rss_mib())})
        print(f"| {n} sessions | load {seconds:.2f} s ({1000 * seconds / n:.2f} ms each) | mark processed "
              f"{mark:.2f} s | find new {pending:.3f} s | peak RSS {rss_mib():.0f} MiB |", flush=True)
    return rows


def write_sessions_range(directory: Path, start: int, stop: int) -> None:
    rng = random.Random(start)
    words = "I moved to Porto last year and work as a nurse my sister lives in Madrid we like hiking".split()
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        msgs = [{"role": "user" if t % 2 == 0 else "assistant",
                 "content": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))} for t in range(6)]
        (directory / f"s{i:06d}.json").write_text(json.dumps({
            "session_id": f"s{i:06d}", "user_id": f"user{i % 50}",
            "created_at": f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}T10:00:00Z", "messages": msgs}))


def bench_db(tmp: Path, sizes, dim: int = 576, batch: int = 1000) -> list:
    from memory.schema import MemoryCandidate
    from memory.vector_db import MemoryVectorDB

    rng = np.random.default_rng(0)
    rows = []
    db = MemoryVectorDB(tmp / "db")
    added = 0
    add_seconds = 0.0
    try:
        for n in sizes:
            while added < n:
                k = min(batch, n - added)
                vecs = rng.normal(size=(k, dim)).astype(np.float32)
                cands = [MemoryCandidate(text=f"The user fact number {added + j} about topic {(added + j) % 997}.",
                                         user_id=f"user{(added + j) % 50}", session_id=f"s{(added + j) % 10000:06d}")
                         for j in range(k)]
                started = time.perf_counter()
                db.add(cands, vecs, "bench-encoder", status="active")
                add_seconds += time.perf_counter() - started
                added += k
            db.flush()
            queries = rng.normal(size=(200, dim)).astype(np.float32)
            search = []
            for q in queries:
                started = time.perf_counter()
                db.search(q[None, :], k=5, user_id="user7", statuses=("active",))
                search.append(time.perf_counter() - started)
            search_all = []
            for q in queries[:50]:
                started = time.perf_counter()
                db.search(q[None, :], k=5, statuses=("active", "pending"))
                search_all.append(time.perf_counter() - started)
            _, (listing,) = _timed(lambda: db.records(user_id="user7"))
            _, (count,) = _timed(lambda: db.count(statuses=("pending",)))
            victims = [int(i) for i in rng.choice(np.arange(1, added + 1), size=20, replace=False)]
            _, (forget,) = _timed(lambda: db.forget(victims))
            q = sorted(search)
            row = {"memories": n, "add_ms_per_memory": round(1000 * add_seconds / added, 3),
                   "search_user_p50_ms": round(1000 * statistics.median(q), 2),
                   "search_user_p99_ms": round(1000 * q[int(0.99 * (len(q) - 1))], 2),
                   "search_all_p50_ms": round(1000 * statistics.median(search_all), 2),
                   "list_one_user_s": round(listing, 3), "count_pending_ms": round(1000 * count, 2),
                   "forget_20_s": round(forget, 3), "rss_mib": round(rss_mib()),
                   "db_mib": round(sum(p.stat().st_size for p in (tmp / "db").iterdir()) / 2 ** 20, 1)}
            rows.append(row)
            print(f"| {n} memories | add {row['add_ms_per_memory']} ms each | search (one user) p50 "
                  f"{row['search_user_p50_ms']} ms, p99 {row['search_user_p99_ms']} ms | search (all) p50 "
                  f"{row['search_all_p50_ms']} ms | list a user {listing:.3f} s | forget 20 {forget:.3f} s | "
                  f"files {row['db_mib']} MiB | peak RSS {row['rss_mib']} MiB |", flush=True)
    finally:
        db.close()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--memories", type=int, default=100_000)
    ap.add_argument("--sizes", default=None, help="comma-separated growth points (default: 1%%, 10%%, 100%%)")
    ap.add_argument("--json", default="bench/results/load.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        def points(total):
            if args.sizes:
                return [int(x) for x in args.sizes.split(",") if int(x) <= total] or [total]
            return [total // 100, total // 10, total]
        print("chat store:")
        store = bench_store(tmp, points(args.sessions))
        print("memory DB:")
        db = bench_db(tmp, points(args.memories))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "store": store, "db": db},
                                          indent=2))


if __name__ == "__main__":
    main()
