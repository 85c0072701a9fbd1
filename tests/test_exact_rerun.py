"""Guarantees of the memory DB under crashes, edits and forgets (issue classes 1-3):

- a crash or kill -9 while facts are stored, then a rerun, equals the uninterrupted run: the
  same rows, statuses and ``superseded_by`` (storing is one transaction with the sessions'
  processed marks);
- a session edited after it was read is read again without storing anything twice;
- a forgotten vector's bytes are in no saved index file or snapshot, also when the forget came
  from another process while this one held the DB open;
- a memory forgotten while a cycle trains on it is never published.
"""
import json
import os
import shutil

import numpy as np
import pytest

import run_training
from bench.fault_injection import db_state, differences, gather_chats, one_run, reference
from memory.ingest import ingest_candidates
from memory.publish import resolve_current
from memory.schema import MemoryCandidate
from memory.vector_db import INDEX_FILENAME, MemoryVectorDB
from memory.vectors import ChatModelVectorizer
from tests.test_daemon import FIRST, ROOT, _files, _flags


@pytest.fixture
def vectorizer(tiny_model, tokenizer):
    return ChatModelVectorizer(tiny_model, tokenizer, "tiny", template="raw")


def _cand(text, ts, sid="s1", idx=0, user="alex"):
    return MemoryCandidate(text=text, user_id=user, session_id=sid, message_index=idx, timestamp=ts)


# statements with updates, a duplicate said again after its fact was superseded, and a late older one
BATCH = [_cand("The user lives in Lyon.", "2026-01-01", "a", 0), _cand("The user likes green tea.", "2026-01-01", "a", 2),
         _cand("The user moved to Nice.", "2026-02-01", "b", 0), _cand("The user likes green tea.", "2026-02-01", "b", 4),
         _cand("The user works as a baker.", "2026-02-02", "c", 0), _cand("The user lives in Lyon.", "2026-03-01", "d", 0),
         _cand("The user now works as a nurse.", "2026-03-02", "d", 2), _cand("The user has a cat named Ziggy.", "2026-03-03", "d", 4),
         _cand("The user works as a teacher.", "2026-01-15", "e", 0)]


def _store(db, vectorizer, candidates, marks=("a", "b", "c", "d", "e")):
    def finish():
        for sid in marks:
            db.mark_session_processed(sid, f"hash-{sid}", None, 1)
    return ingest_candidates(db, candidates, vectorizer, near_duplicate_cosine=1.01, finish=finish)


@pytest.mark.reliability(fault="Crash (an exception, as a kill -9 leaves it) at the k-th row stored, then a rerun",
                         outcome="the same rows, statuses and superseded_by as the uninterrupted run; nothing half-stored")
@pytest.mark.parametrize("crash_at", [1, 3, 6, 8])
def test_a_crash_while_storing_then_a_rerun_equals_the_uninterrupted_run(tmp_path, vectorizer, monkeypatch, crash_at):
    with MemoryVectorDB(tmp_path / "ref") as ref:
        _store(ref, vectorizer, BATCH)
    want = db_state(tmp_path / "ref")
    assert any(r["status"] == "superseded" for r in want["memories"])

    real, calls = MemoryVectorDB._insert_rows, []

    def power_cut(self, *a, **k):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError("power cut")
        return real(self, *a, **k)

    db = MemoryVectorDB(tmp_path / "crashed")
    monkeypatch.setattr(MemoryVectorDB, "_insert_rows", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        _store(db, vectorizer, BATCH)
    monkeypatch.setattr(MemoryVectorDB, "_insert_rows", real)
    assert db.count() == 0 and db.session_state("a") is None  # nothing half-stored, no session marked
    db.close()  # the process is gone; the rerun opens the DB again
    with MemoryVectorDB(tmp_path / "crashed") as db:
        _store(db, vectorizer, BATCH)
    assert differences(want, db_state(tmp_path / "crashed")) == []


@pytest.mark.reliability(fault="A session edited after it was read (a message appended), read again",
                         outcome="nothing stored twice, superseded rows included; only the new fact is added")
def test_an_edited_session_is_read_again_without_duplicates(tmp_path, vectorizer):
    with MemoryVectorDB(tmp_path / "db") as db:
        first = _store(db, vectorizer, BATCH)
        before = db_state(tmp_path / "db")["memories"]
        added = _cand("The user plays the oboe.", "2026-03-04", "d", 6)
        again = ingest_candidates(db, BATCH + [added], vectorizer, near_duplicate_cosine=1.01)
    after = db_state(tmp_path / "db")["memories"]
    assert again.already_stored == len(first.added) and len(again.added) == 1
    assert after[:len(before)] == before and [r["text"] for r in after[len(before):]] == [added.text]


@pytest.mark.reliability(fault="kill -9 of run_training.py (steps 0-2) at every DB commit and at random times, then a rerun",
                         outcome="the DB equals the uninterrupted run's (bench.fault_injection prints N runs, 0 differences)")
def test_kill_9_anywhere_in_extraction_then_a_rerun_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    chats = tmp_path / "chats"
    gather_chats([ROOT / "examples" / "chats"], chats)
    for f in sorted(chats.iterdir())[4:]:
        f.unlink()
    flags = ["--model_name_or_path", str(tiny_model_dir), "--precision", "fp32"]
    env = {k: v for k, v in os.environ.items() if k != "RECALL_MEMORY_CRASH_AT"}
    ref = reference(chats, tmp_path, flags, env)
    assert ref["commits"] >= 1 and len(ref["state"]["memories"]) > 5
    points = [("commit", n) for n in range(1, ref["commits"] + 1)] + [("time", ref["seconds"] * f) for f in (0.5, 0.9)]
    results = [one_run(i, p, chats, tmp_path, flags, env, ref) for i, p in enumerate(points)]
    assert all(r["killed"] for r in results if r["kind"] == "commit")
    assert [r["differences"] for r in results] == [[] for _ in results]


# --------------------------------------------------------------------- forgotten vector bytes
def _vectors(n, d=32, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _bytes_left(path, vectors) -> int:
    data = open(path, "rb").read()
    return sum(v.tobytes() in data for v in vectors)


@pytest.mark.reliability(fault="forget, then add and save in the same process (small index: compacted; large: zeroed)",
                         outcome="no forgotten vector's bytes in the index file or a snapshot", cls="forget")
@pytest.mark.parametrize("compact_max", [5_000, 0])
def test_forgotten_vector_bytes_do_not_come_back_with_a_later_save(tmp_path, monkeypatch, compact_max):
    monkeypatch.setattr("memory.vector_db.COMPACT_MAX", compact_max)
    old, new = _vectors(20), _vectors(6, seed=1)
    with MemoryVectorDB(tmp_path / "db") as db:
        ids = db.add([MemoryCandidate(f"fact {i}", "u") for i in range(20)], old, "enc")
        db.flush()
        old = db.vectors(ids)  # the bytes as stored (normalised again on the way in)
        db.forget(ids[:10])
        for i in range(3):  # each add reuses or not a freed slot; each save must stay clean
            db.add([MemoryCandidate(f"new {i} {j}", "u") for j in range(2)], new[2 * i:2 * i + 2], "enc")
            db.flush()
            assert _bytes_left(tmp_path / "db" / INDEX_FILENAME, old[:10]) == 0
        db.snapshot(tmp_path / "snap")
        assert all(h.record.id not in ids[:10] for h in db.search(old[0], k=20, statuses=("pending",))[0])
    assert _bytes_left(tmp_path / "snap" / INDEX_FILENAME, old[:10]) == 0
    assert _bytes_left(tmp_path / "db" / INDEX_FILENAME, old[10:]) == 10  # the live ones are all there


@pytest.mark.reliability(fault="forget from another process while a run holds the DB open, then the run saves",
                         outcome="the run's save and snapshot hold no forgotten vector; search never returns it", cls="forget")
def test_a_forget_by_another_process_is_honoured_by_the_holder_s_next_save(tmp_path):
    vecs = _vectors(12)
    run = MemoryVectorDB(tmp_path / "db")  # the training run, holding its index in memory
    ids = run.add([MemoryCandidate(f"fact {i}", "u") for i in range(12)], vecs, "enc")
    run.flush()
    vecs = run.vectors(ids)
    with MemoryVectorDB(tmp_path / "db") as cli:  # python -m memory forget
        cli.forget(ids[:4])
    run.add([MemoryCandidate("later fact", "u")], _vectors(1, seed=3), "enc")
    run.flush()
    assert _bytes_left(tmp_path / "db" / INDEX_FILENAME, vecs[:4]) == 0
    run.snapshot(tmp_path / "snap")
    assert _bytes_left(tmp_path / "snap" / INDEX_FILENAME, vecs[:4]) == 0
    assert _bytes_left(tmp_path / "snap" / INDEX_FILENAME, vecs[4:]) == 8
    assert all(h.record.id not in ids[:4] for h in run.search(vecs[0], k=12, statuses=("pending",))[0])
    run.close()


# --------------------------------------------------------------------- forget during a cycle
def _forget_when(monkeypatch, out, target, when):
    """Run ``python -m memory forget`` (as another DB connection) at ``when`` of publishing."""
    from memory import publish as publish_mod

    def forget():
        with MemoryVectorDB(out / "memory_db") as cli:
            cli.forget([r.id for r in cli.records() if r.text == target])

    if when == "before the snapshot":
        real = MemoryVectorDB.snapshot

        def snapshot(self, dest):
            forget()
            return real(self, dest)
        monkeypatch.setattr(MemoryVectorDB, "snapshot", snapshot)
    else:
        real_switch = publish_mod._switch_current

        def switch(models_dir, name):
            forget()
            return real_switch(models_dir, name)
        monkeypatch.setattr(publish_mod, "_switch_current", switch)


@pytest.mark.reliability(fault="forget while the cycle trains: before the snapshot is copied, and between the copy and the switch",
                         outcome="before: nothing is published (the run is retired); between: erased from the new version", cls="forget")
@pytest.mark.parametrize("when", ["before the snapshot", "before the switch"])
def test_a_memory_forgotten_during_the_cycle_is_not_published(tiny_model_dir, tmp_path, monkeypatch, when):
    f = _files(tmp_path)
    out = tmp_path / "out"
    _forget_when(monkeypatch, out, FIRST[1], when)
    assert run_training.main(_flags(tiny_model_dir, tmp_path, out) + ["--memories", str(f["first"])]) == 0
    if when == "before the snapshot":
        assert not list((out / "models").glob("model_*"))
        [run] = list((out / "runs").iterdir())
        assert "forgotten" in json.loads((run / "stages" / "abandoned.json").read_text())["reason"]
        return
    current = resolve_current(out / "models")
    with MemoryVectorDB(current / "memory_db") as snap:
        texts = [r.text for r in snap.records()]
    assert FIRST[1] not in texts and FIRST[0] in texts
    assert FIRST[1].encode() not in (current / "memory_db" / "memories.sqlite3").read_bytes()
    shutil.rmtree(out)
