"""Tests for memory.vector_db: records in SQLite, vectors in a usearch index (derived cache)."""
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from usearch.index import Index

from memory.schema import MemoryCandidate
from memory.vector_db import (
    DB_FILENAME,
    INDEX_FILENAME,
    EncoderMismatchError,
    MemoryVectorDB,
    normalize_text,
)

DIM = 16
ENC = "enc-a"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit(n, dim=DIM, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def cands(n, user="u1", prefix="fact"):
    return [MemoryCandidate(text=f"{prefix} {i}", user_id=user, session_id="s1",
                            message_index=i, timestamp="2024-01-01T00:00:00+00:00")
            for i in range(n)]


def hit_ids(hits):
    return [h.record.id for h in hits]


@pytest.fixture
def db(tmp_path):
    d = MemoryVectorDB(tmp_path / "db")
    yield d
    d.close()


def test_add_search_roundtrip_scores(db):
    vecs = unit(50)
    ids = db.add(cands(50), vecs * 3.0, ENC, status="active")  # stored normalised
    assert ids == sorted(ids) and len(set(ids)) == 50
    hits = db.search(vecs[7], k=3)
    assert len(hits) == 1 and len(hits[0]) == 3
    assert hits[0][0].record.id == ids[7]
    assert hits[0][0].record.text == "fact 7"
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    scores = [h.score for h in hits[0]]
    assert scores == sorted(scores, reverse=True)
    expected = vecs @ vecs[7]
    assert scores[1] == pytest.approx(np.sort(expected)[-2], abs=1e-5)
    np.testing.assert_allclose(db.vectors([ids[3], ids[1]]), vecs[[3, 1]], atol=1e-6)
    assert db.encoder_id == ENC and db.ndim == DIM


def test_file_modes(tmp_path):
    with MemoryVectorDB(tmp_path / "db") as d:
        d.add(cands(2), unit(2), ENC)
    assert stat.S_IMODE(os.stat(tmp_path / "db").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "db" / DB_FILENAME).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "db" / INDEX_FILENAME).st_mode) == 0o600


def test_persistence_and_reload(tmp_path):
    vecs, queries = unit(300), unit(10, seed=1)
    with MemoryVectorDB(tmp_path / "db") as d:
        d.add(cands(300), vecs, ENC, status="active")
        before = [hit_ids(h) for h in d.search(queries, k=5)]
    with MemoryVectorDB(tmp_path / "db") as d:
        assert d.count() == 300 and d.encoder_id == ENC
        assert [hit_ids(h) for h in d.search(queries, k=5)] == before


def test_encoder_mismatch_refused(db):
    db.add(cands(2), unit(2), ENC)
    with pytest.raises(EncoderMismatchError, match="enc-a.*enc-b"):
        db.add(cands(2), unit(2), "enc-b")
    assert db.count() == 2


def test_ndim_mismatch_refused(db):
    db.add(cands(2), unit(2), ENC)
    with pytest.raises(EncoderMismatchError, match="16-d.*8-d"):
        db.add(cands(2), unit(2, dim=8), ENC)
    with pytest.raises(EncoderMismatchError):
        db.search(unit(1, dim=8))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_vectors_refused(db, bad):
    vecs = unit(3)
    vecs[1, 4] = bad
    with pytest.raises(ValueError, match=r"rows \[1\] are not finite"):
        db.add(cands(3), vecs, ENC)
    assert db.count() == 0 and db.encoder_id is None


def test_shape_and_length_checks(db):
    with pytest.raises(ValueError, match="shape"):
        db.add(cands(3), unit(2), ENC)
    with pytest.raises(ValueError, match="shape"):
        db.add(cands(1), unit(1)[0], ENC)
    with pytest.raises(ValueError, match="all zero"):
        db.add(cands(1), np.zeros((1, DIM), np.float32), ENC)
    with pytest.raises(ValueError, match="subject_keys"):
        db.add(cands(2), unit(2), ENC, subject_keys=["a"])


def test_status_filter(db):
    vecs = unit(20)
    ids = db.add(cands(20), vecs, ENC)  # pending
    assert db.search(vecs[0], k=5) == [[]]
    assert db.search(vecs[0], k=5, statuses=()) == [[]]
    assert len(db.search(vecs[0], k=5, statuses=None)[0]) == 5
    db.set_status(ids[:10], "active")
    got = hit_ids(db.search(vecs[15], k=20)[0])
    assert set(got) == set(ids[:10])
    got = hit_ids(db.search(vecs[15], k=1, statuses=("pending",))[0])
    assert got == [ids[15]]
    db.set_status([ids[0]], "deleted")
    assert ids[0] not in hit_ids(db.search(vecs[0], k=20)[0])
    db.set_status([ids[0]], "active")  # back into the index from the SQLite vector
    assert hit_ids(db.search(vecs[0], k=1)[0]) == [ids[0]]


def test_supersede(db):
    ids = db.add(cands(2), unit(2), ENC, status="active")
    db.set_status([ids[0]], "superseded", superseded_by=ids[1])
    rec = db.get(ids[0])
    assert rec.status == "superseded" and rec.superseded_by == ids[1]
    with pytest.raises(KeyError):
        db.set_status([ids[0]], "superseded", superseded_by=999)
    with pytest.raises(ValueError, match="superseded_by"):
        db.set_status([ids[0]], "active", superseded_by=ids[1])
    with pytest.raises(KeyError):
        db.get(999)


def test_user_filter_among_many(tmp_path):
    n_other = 5000
    with MemoryVectorDB(tmp_path / "db") as d:
        other = d.add([MemoryCandidate(text=f"o{i}", user_id=f"user{i % 50}")
                       for i in range(n_other)], unit(n_other), ENC, status="active")
        mine = d.add(cands(3, user="rare"), unit(3, seed=9), ENC, status="active")
        for q in unit(5, seed=2):
            hits = d.search(q, k=10, user_id="rare")[0]
            assert sorted(hit_ids(hits)) == mine
        # a large subset goes through HNSW + filtering and still gets k hits of that user
        hits = d.search(unit(1, seed=3), k=10, statuses=("active",))[0]
        assert len(hits) == 10 and set(hit_ids(hits)) <= set(other) | set(mine)
        assert d.count(user_id="rare") == 3 and d.count() == n_other + 3


@pytest.mark.parametrize("brute_force_max", [10**6, 0], ids=["brute-force", "hnsw"])
def test_large_subset_filter(tmp_path, brute_force_max):
    vecs = unit(6000)
    users = ["a" if i % 2 == 0 else "b" for i in range(6000)]  # 3000 > EXACT_SEARCH_MAX
    with MemoryVectorDB(tmp_path / "db", brute_force_max=brute_force_max) as d:
        ids = np.array(d.add([MemoryCandidate(text=f"t{i}", user_id=u)
                              for i, u in enumerate(users)], vecs, ENC, status="active"))
        mask = np.array([u == "a" for u in users])
        queries = unit(20, seed=4)
        results = d.search(queries, k=10, user_id="a")
        recall = []
        for q, hits in zip(queries, results):
            got = hit_ids(hits)
            assert len(got) == 10 and all(h.record.user_id == "a" for h in hits)
            truth = ids[mask][np.argsort(-(vecs[mask] @ q))[:10]].tolist()
            if brute_force_max:  # brute force + filtering is exact, order included
                assert got == truth
            recall.append(len(set(got) & set(truth)) / 10)
        assert np.mean(recall) >= 0.9


def test_forget(tmp_path):
    vecs = unit(10)
    with MemoryVectorDB(tmp_path / "db") as d:
        ids = d.add(cands(10, prefix="secret-zebra-password"), vecs, ENC, status="active")
        d.set_cues(ids[4], ["zebra cue"])
        stored = d.vectors([ids[4], ids[5]])
        d.forget([ids[4]])
        assert ids[4] not in hit_ids(d.search(vecs[4], k=10)[0])
        rec = d.get(ids[4])
        assert rec.status == "deleted" and rec.text == "" and rec.cues == []
        with pytest.raises(ValueError, match="forgotten"):
            d.vectors([ids[4]])
        with pytest.raises(ValueError, match="forgotten"):
            d.set_status([ids[4]], "active")
        new = d.add(cands(1), unit(1, seed=5), ENC)
        assert new[0] > max(ids)  # ids never reused
        index_bytes = open(tmp_path / "db" / INDEX_FILENAME, "rb").read()
        assert stored[0].tobytes() not in index_bytes
        assert stored[1].tobytes() in index_bytes
    with MemoryVectorDB(tmp_path / "db") as d:
        assert ids[4] not in hit_ids(d.search(vecs[4], k=10)[0])
        assert hit_ids(d.search(vecs[5], k=1)[0]) == [ids[5]]
    blob = b"".join(open(tmp_path / "db" / f, "rb").read() for f in os.listdir(tmp_path / "db"))
    assert b"secret-zebra-password 4" not in blob
    assert b"secret-zebra-password 5" in blob


def test_forget_duplicate_vector_keeps_twin(tmp_path):
    vec = unit(1)
    with MemoryVectorDB(tmp_path / "db") as d:
        ids = d.add(cands(2), np.repeat(vec, 2, axis=0), ENC, status="active")
        ids += d.add(cands(50, prefix="x"), unit(50, seed=3), ENC, status="active")
        stored = d.vectors([ids[1], ids[2]])
        d.set_status([ids[2]], "deleted")
        d.set_status([ids[2]], "active")  # re-activated before the save: must stay intact
        d.forget([ids[0]])
    index = Index.restore(str(tmp_path / "db" / INDEX_FILENAME))
    assert len(index) == 51 and not index.contains(ids[0])
    np.testing.assert_array_equal(index.get(ids[1]), stored[0])  # the live twin is not zeroed
    np.testing.assert_array_equal(index.get(ids[2]), stored[1])


def _reference(path, queries):
    with MemoryVectorDB(path) as d:
        return [hit_ids(h) for h in d.search(queries, k=5, statuses=("active", "pending"))]


@pytest.mark.reliability(fault='Corrupt vector index', outcome='rebuilt from SQLite')
def test_corrupt_index_rebuilt(tmp_path, caplog):
    path, queries = tmp_path / "db", unit(8, seed=1)
    with MemoryVectorDB(path) as d:
        d.add(cands(200), unit(200), ENC, status="active")
        d.add(cands(20, prefix="p"), unit(20, seed=7), ENC)
    before = _reference(path, queries)
    with open(path / INDEX_FILENAME, "wb") as f:
        f.write(np.random.default_rng(0).bytes(5000))
    with caplog.at_level("WARNING", logger="memory.vector_db"):
        assert _reference(path, queries) == before
    assert "rebuilding" in caplog.text


@pytest.mark.reliability(fault='Truncated vector index', outcome='rebuilt from SQLite')
def test_truncated_index_rebuilt(tmp_path):
    path, queries = tmp_path / "db", unit(8, seed=1)
    with MemoryVectorDB(path) as d:
        d.add(cands(200), unit(200), ENC, status="active")
    before = _reference(path, queries)
    data = open(path / INDEX_FILENAME, "rb").read()
    open(path / INDEX_FILENAME, "wb").write(data[: len(data) // 2])
    assert _reference(path, queries) == before


@pytest.mark.reliability(fault="Another DB's index file", outcome='detected and rebuilt')
def test_foreign_index_rebuilt(tmp_path):
    """A readable index that is not the one last saved (same keys, other vectors) is rebuilt."""
    for name, seed in [("a", 0), ("b", 1)]:
        with MemoryVectorDB(tmp_path / name) as d:
            d.add(cands(50), unit(50, seed=seed), ENC, status="active")
    os.replace(tmp_path / "b" / INDEX_FILENAME, tmp_path / "a" / INDEX_FILENAME)
    with MemoryVectorDB(tmp_path / "a") as d:
        expected = d.vectors([1, 2])
    index = Index.restore(str(tmp_path / "a" / INDEX_FILENAME))
    np.testing.assert_array_equal(np.stack([index.get(1), index.get(2)]), expected)


@pytest.mark.reliability(fault='Missing vector index', outcome='rebuilt from SQLite')
def test_missing_index_rebuilt(tmp_path, caplog):
    path, queries = tmp_path / "db", unit(8, seed=1)
    with MemoryVectorDB(path) as d:
        d.add(cands(200), unit(200), ENC, status="active")
    before = _reference(path, queries)
    os.remove(path / INDEX_FILENAME)
    with caplog.at_level("WARNING", logger="memory.vector_db"):
        assert _reference(path, queries) == before
    assert "missing" in caplog.text
    assert os.path.exists(path / INDEX_FILENAME)


@pytest.mark.reliability(fault='Process killed right after adding memories', outcome='nothing lost')
def test_killed_after_add_keeps_records(tmp_path):
    path = tmp_path / "db"
    with MemoryVectorDB(path) as d:
        d.add(cands(5), unit(5), ENC, status="active")
    script = (
        "import os, numpy as np\n"
        "from memory.schema import MemoryCandidate\n"
        "from memory.vector_db import MemoryVectorDB\n"
        f"d = MemoryVectorDB({str(path)!r})\n"
        f"v = np.eye({DIM}, dtype=np.float32)[:1]\n"
        "print(d.add([MemoryCandidate(text='late', user_id='u1')], v, 'enc-a', status='active')[0])\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True)
    new_id = int(out.stdout.strip())
    with MemoryVectorDB(path) as d:
        assert d.count() == 6
        hits = d.search(np.eye(DIM, dtype=np.float32)[0], k=1)[0]
        assert hit_ids(hits) == [new_id] and hits[0].record.text == "late"
    assert Index.restore(str(path / INDEX_FILENAME)).contains(new_id)  # index repaired


def test_find_by_text_and_normalize(db):
    assert normalize_text("  I  like\tTea!! ") == "i like tea"
    ids = db.add([MemoryCandidate(text="I like tea.", user_id="u1"),
                  MemoryCandidate(text="I like tea", user_id="u2")], unit(2), ENC)
    assert db.find_by_text("u1", "i like tea").id == ids[0]
    assert db.find_by_text("u2", normalize_text("I LIKE TEA?")).id == ids[1]
    assert db.find_by_text("u3", "i like tea") is None
    db.set_status([ids[0]], "superseded")
    assert db.find_by_text("u1", "i like tea") is None
    assert db.find_by_text("u1", "i like tea", statuses=("superseded",)).id == ids[0]


def test_records_cues_subject_keys(db):
    ids = db.add(cands(3), unit(3), ENC, subject_keys=["pet", None, "job"])
    db.set_cues(ids[1], ["a", "b"])
    recs = db.records(user_id="u1", statuses=("pending",))
    assert [r.id for r in recs] == ids
    assert [r.subject_key for r in recs] == ["pet", None, "job"]
    assert recs[1].cues == ["a", "b"] and recs[0].cues == []
    assert recs[0].said_at == "2024-01-01T00:00:00+00:00" and recs[0].created_at.endswith("+00:00")
    with pytest.raises(ValueError, match="unknown statuses"):
        db.records(statuses=("bogus",))


def test_session_bookkeeping(tmp_path):
    with MemoryVectorDB(tmp_path / "db") as d:
        assert d.session_state("s1") is None
        d.mark_session_processed("s1", "hash1", "/chats/s1.json", 4)
        assert d.session_state("s1") == "hash1"
        d.mark_session_processed("s1", "hash2", "/chats/s1.json", 5)
    with MemoryVectorDB(tmp_path / "db") as d:
        assert d.session_state("s1") == "hash2"
        assert d.session_state("s2") is None


def test_closed_db_raises(tmp_path):
    d = MemoryVectorDB(tmp_path / "db")
    d.close()
    d.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        d.count()
