"""Memory records in SQLite plus a usearch (HNSW) index over their vectors.

SQLite (``<dir>/memories.sqlite3``, WAL mode) is the source of truth: every row keeps its
text, metadata and its L2-normalised float32 vector as a BLOB.  The usearch index
(``<dir>/memories.usearch``, cosine metric, keyed by record id) is a derived cache that holds
the vectors of records whose status is in ``INDEXED_STATUSES``.

Durability: ``add`` and friends return after the SQLite commit.  The index is saved lazily, by
``flush()`` and ``close()`` (and at once by ``forget``), with write-to-temp + ``os.replace``;
its SHA-256 is recorded in the ``meta`` table.  On open the index is rebuilt from SQLite when it
is missing, unreadable or not the file we last saved, and repaired key by key when it is an
older save (e.g. the process died after ``add`` but before ``flush``).  Repairing by key is
sound because a record's vector never changes and ids are never reused.

Search: exact numpy search over SQLite rows when the filtered subset is small; otherwise the
index is searched (brute force up to ``brute_force_max`` vectors, HNSW beyond) and filtered,
over-fetching progressively, with an exact fallback when HNSW cannot reach k matches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import sqlite3
import threading
import unicodedata
from datetime import datetime, timezone
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np
from usearch.index import Index, Matches, MetricKind, ScalarKind

from memory.faults import after_commit
from memory.schema import MemoryCandidate

logger = logging.getLogger(__name__)

STATUSES = ("pending", "active", "superseded", "deleted")
INDEXED_STATUSES = ("pending", "active", "superseded")
DB_FILENAME = "memories.sqlite3"
INDEX_FILENAME = "memories.usearch"
SCHEMA_VERSION = "1"

# Measured with `python3 -m bench.vector_db_bench --data both` (bench/results/vector_db.json;
# 2 loaded cores, 576-d, 100k vectors, one query per search).  On structured data shaped like
# sentence embeddings, 16 / 128 / 128 is the fastest grid setting with recall@10 >= 0.995 at 20k
# (the usearch default expansion_search=64 gives 0.990): at 100k recall@10 0.997 at 1.8 ms p50,
# against 28.7 ms for exact search.  Exact search (usearch exact=True over the same index, recall
# 1.0) is at parity with that HNSW up to ~3k vectors (exact/HNSW p50 1.10 at 2.5k, 0.87 at 3k)
# and slower beyond (1.3x at 4k, 1.7x at 5k, 16x at 100k), so it is kept for indexes up to
# DEFAULT_BRUTE_FORCE_MAX only.  Uniformly random vectors are the worst case: there HNSW recall@10
# falls from 0.80 at 4k to 0.11 at 100k with these settings (~0.5 with expansion_search=1024 in
# an earlier run), and only exact search reaches 0.99; real embeddings have far lower intrinsic
# dimension.
DEFAULT_CONNECTIVITY = 16
DEFAULT_EXPANSION_ADD = 128
DEFAULT_EXPANSION_SEARCH = 128
DEFAULT_BRUTE_FORCE_MAX = 3_000

# Filtered subsets at most this large, or smaller than this fraction of the index, are
# searched exactly from their SQLite rows: filtering index results would need a huge
# over-fetch to find them.
EXACT_SEARCH_MAX = 2048
EXACT_SEARCH_FRACTION = 0.02
# On save, an index that had entries removed (forget, 'deleted') and holds at most this many
# vectors is rebuilt from its live entries, so no removed vector stays in the file or in memory
# (20k vectors of 576-d take ~10-19 s to re-insert on 2 cores, 2k take 0.3 s). Larger indexes
# are saved with every removed vector's bytes zeroed in the file instead (_scrub_file).
COMPACT_MAX = 5_000
BUSY_TIMEOUT_S = 60.0
_SQL_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's variable limit
_REBUILD_CHUNK = 8192

_COLUMNS = (
    "id, user_id, text, status, session_id, message_index, said_at, source, created_at, "
    "updated_at, superseded_by, encoder_id, subject_key, cues"
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused
    user_id TEXT NOT NULL,
    text TEXT NOT NULL,
    norm_text TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN {STATUSES!r}),
    session_id TEXT,
    message_index INTEGER,
    said_at TEXT,
    source TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    superseded_by INTEGER REFERENCES memories(id),
    encoder_id TEXT NOT NULL,
    subject_key TEXT,
    cues TEXT NOT NULL DEFAULT '[]',
    vector BLOB
);
CREATE INDEX IF NOT EXISTS memories_user_status ON memories (user_id, status);
CREATE INDEX IF NOT EXISTS memories_status ON memories (status);
CREATE INDEX IF NOT EXISTS memories_user_norm_text ON memories (user_id, norm_text);
-- what was forgotten, as hashes only: a fact the user had erased must not come back from a
-- later extraction or import (see MemoryVectorDB.forget)
CREATE TABLE IF NOT EXISTS forgotten (
    user_id TEXT NOT NULL,
    key TEXT NOT NULL,
    forgotten_at TEXT NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE TABLE IF NOT EXISTS processed_sessions (
    session_id TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    source_path TEXT,
    n_candidates INTEGER NOT NULL,
    processed_at TEXT NOT NULL
);
"""


def forgotten_keys(text: str) -> List[str]:
    """Tombstone keys of a memory text: a hash of its normalised text, and a hash of its set of
    words (the same fact in another order: 'the password is X' / 'X is the password')."""
    norm = normalize_text(text)
    words = " ".join(sorted(set(re.findall(r"\w+", norm))))
    return ["t:" + hashlib.sha256(norm.encode()).hexdigest(), "w:" + hashlib.sha256(words.encode()).hexdigest()]


_TRAILING_PUNCT = ".,;:!?\u2026\u3002\uff01\uff1f"
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass
class MemoryRecord:
    id: int
    user_id: str
    text: str
    status: str
    session_id: Optional[str]
    message_index: Optional[int]
    said_at: Optional[str]
    source: str
    created_at: str
    updated_at: str
    superseded_by: Optional[int]
    encoder_id: str
    subject_key: Optional[str]
    cues: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SearchHit:
    record: MemoryRecord
    score: float  # cosine similarity, higher is better


class EncoderMismatchError(ValueError):
    """Vectors from another encoder (or of another width) than the database holds."""


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, collapse whitespace, strip trailing sentence punctuation."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = _WHITESPACE.sub(" ", s).strip()
    return s.rstrip(_TRAILING_PUNCT + " ")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _chunks(items: Sequence, size: int = _SQL_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def _row_to_record(row: sqlite3.Row) -> MemoryRecord:
    values = dict(row)
    values["cues"] = json.loads(values["cues"])
    return MemoryRecord(**values)


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scrub_file(path: str, patterns: Sequence[bytes]) -> int:
    """Zero every occurrence of each pattern in ``path``; returns how many were zeroed.

    usearch keeps a removed entry's vector in its file (as a routing node), so the vectors of
    forgotten records would linger on disk without this.
    """
    zeroed = 0
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        for pattern in patterns:
            pos = mm.find(pattern)
            while pos != -1:
                mm[pos:pos + len(pattern)] = bytes(len(pattern))
                zeroed += 1
                pos = mm.find(pattern, pos + len(pattern))
        mm.flush()
    return zeroed


def _as_int_ids(ids: Iterable[int], what: str = "ids") -> List[int]:
    if isinstance(ids, (int, np.integer)):
        ids = [ids]
    out = [int(i) for i in ids]
    if any(i <= 0 for i in out):
        raise ValueError(f"{what} must be positive record ids, got {out}")
    return out


class MemoryVectorDB:
    """Memory records (SQLite, source of truth) with a usearch vector index (derived cache)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        connectivity: int = DEFAULT_CONNECTIVITY,
        expansion_add: int = DEFAULT_EXPANSION_ADD,
        expansion_search: int = DEFAULT_EXPANSION_SEARCH,
        brute_force_max: int = DEFAULT_BRUTE_FORCE_MAX,
        threads: int = 0,
    ):
        self.directory = os.fspath(directory)
        self.db_path = os.path.join(self.directory, DB_FILENAME)
        self.index_path = os.path.join(self.directory, INDEX_FILENAME)
        self._connectivity = connectivity
        self._expansion_add = expansion_add
        self._expansion_search = expansion_search
        self._brute_force_max = brute_force_max
        self._threads = threads or os.cpu_count() or 1
        self._lock = threading.RLock()
        self._index: Optional[Index] = None
        self._dirty = False
        self._in_batch = False  # inside batch(): operations are savepoints of one transaction
        self._scrub: List[bytes] = []  # vector bytes of forgotten records, see _scrub_file
        self._subset_sizes: dict = {}  # (user_id, statuses) -> indexed count; reset on change
        self._conn: Optional[sqlite3.Connection] = self._open_sqlite()
        try:
            self._meta = self._read_meta()
            self._open_index()
        except BaseException:
            self._conn.close()
            raise

    # ----------------------------------------------------------------------------- opening

    def _open_sqlite(self) -> sqlite3.Connection:
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=0o700)
            os.chmod(self.directory, 0o700)
        if not os.path.exists(self.db_path):
            os.close(os.open(self.db_path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
            os.chmod(self.db_path, 0o600)
        try:
            # a writer waits up to BUSY_TIMEOUT_S for another's transaction (a run storing a batch)
            conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_S)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")  # forgotten text is zeroed on disk
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.db_path}: cannot open memory database: {e}") from e
        return conn

    def _read_meta(self) -> dict:
        meta = {r["key"]: r["value"] for r in self._conn.execute("SELECT key, value FROM meta")}
        version = meta.get("schema_version")
        if version is None:
            self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            meta["schema_version"] = SCHEMA_VERSION
        elif version != SCHEMA_VERSION:
            raise ValueError(
                f"{self.db_path}: meta.schema_version is {version!r}, expected {SCHEMA_VERSION!r}"
            )
        return meta

    def _new_index(self, ndim: int) -> Index:
        return Index(
            ndim=ndim, metric="cos", dtype="f32", connectivity=self._connectivity,
            expansion_add=self._expansion_add, expansion_search=self._expansion_search,
        )

    def _open_index(self) -> None:
        ndim = self.ndim
        if ndim is None:
            if os.path.exists(self.index_path):
                logger.warning("%s: index file but no records in %s; removing it",
                               self.index_path, self.db_path)
                os.remove(self.index_path)
            return
        index = self._load_index_file(ndim)
        if index is None:
            self._index = self._rebuild_index(ndim)
        else:
            self._index = index
            self._repair_keys()
        if self._dirty:
            self.flush()

    def _load_index_file(self, ndim: int) -> Optional[Index]:
        """The saved index, or None (with a warning) when it cannot be trusted."""
        path = self.index_path
        if not os.path.exists(path):
            logger.warning("%s: index file missing; rebuilding from %s", path, self.db_path)
            return None
        if _sha256_file(path) != self._meta.get("index_sha256"):
            logger.warning("%s: not the index last saved for %s (corrupt or stale); rebuilding",
                           path, self.db_path)
            return None
        try:
            index = Index.restore(path)
        except (ValueError, RuntimeError) as e:
            logger.warning("%s: unreadable index (%s); rebuilding from %s", path, e, self.db_path)
            return None
        if index is None or index.ndim != ndim or index.dtype != ScalarKind.F32 or \
                index.metric_kind != MetricKind.Cos:
            logger.warning("%s: index does not match ndim=%d, f32, cos; rebuilding", path, ndim)
            return None
        index.expansion_add = self._expansion_add
        index.expansion_search = self._expansion_search
        return index

    def _rebuild_index(self, ndim: int) -> Index:
        index = self._new_index(ndim)
        ids = self._indexed_ids()
        for chunk in _chunks(ids, _REBUILD_CHUNK):
            index.add(np.asarray(chunk, dtype=np.uint64), self._read_vectors(chunk),
                      threads=self._threads)
        logger.info("%s: rebuilt index with %d vectors", self.index_path, len(index))
        self._dirty = True
        return index

    def _repair_keys(self, why: str = "behind") -> None:
        """Make the index keys equal the ids that should be indexed (after a crash, or when
        another process changed the records)."""
        want = np.asarray(self._indexed_ids(), dtype=np.int64)
        have = self._index.keys[:].astype(np.int64)
        missing, extra = np.setdiff1d(want, have), np.setdiff1d(have, want)
        if missing.size == 0 and extra.size == 0:
            return
        log = logger.warning if why == "behind" else logger.info
        log("%s: index is %s %s (%d missing, %d extra keys); repairing",
            self.index_path, why, self.db_path, missing.size, extra.size)
        self._index_remove(extra.tolist())
        for chunk in _chunks(missing.tolist(), _REBUILD_CHUNK):
            self._index_add(chunk, self._read_vectors(chunk))

    # ---------------------------------------------------------------------- meta & helpers

    @property
    def encoder_id(self) -> Optional[str]:
        return self._meta.get("encoder_id")

    @property
    def ndim(self) -> Optional[int]:
        value = self._meta.get("ndim")
        return None if value is None else int(value)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"{self.db_path}: database is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; inside ``batch()``, a savepoint of the batch's transaction."""
        conn = self._connection()
        self._subset_sizes.clear()
        nested = self._in_batch
        conn.execute("SAVEPOINT op" if nested else "BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK TO op" if nested else "ROLLBACK")
            if nested:
                conn.execute("RELEASE op")
            raise
        conn.execute("RELEASE op" if nested else "COMMIT")
        if not nested:
            after_commit()  # fault injection (memory.faults): a kill -9 right after this commit

    @contextlib.contextmanager
    def batch(self) -> Iterator["MemoryVectorDB"]:
        """Every change inside is ONE transaction: all of it is stored, or, on an exception,
        a SIGKILL or a power cut, none of it. Other writers wait (SQLite's write lock) meanwhile."""
        with self._lock:
            if self._in_batch:
                raise ValueError(f"{self.db_path}: batch() is not reentrant")
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            self._in_batch = True
            try:
                yield self
            except BaseException:
                conn.execute("ROLLBACK")
                self._in_batch = False
                self._after_rollback()
                raise
            self._in_batch = False
            conn.execute("COMMIT")
            after_commit()

    def _after_rollback(self) -> None:
        """The index and cached meta as the rolled-back batch found them."""
        self._subset_sizes.clear()
        self._meta = self._read_meta()
        if self.ndim is None:
            self._index = None
        elif self._index is not None:
            self._repair_keys("rolled back to")

    def _set_meta(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
        self._meta[key] = value

    def _check_statuses(self, statuses: Optional[Iterable[str]]) -> Optional[tuple]:
        if statuses is None:
            return None
        statuses = (statuses,) if isinstance(statuses, str) else tuple(statuses)
        bad = [s for s in statuses if s not in STATUSES]
        if bad:
            raise ValueError(f"{self.db_path}: unknown statuses {bad}; expected one of {STATUSES}")
        return statuses

    def _where(self, user_id: Optional[str], statuses: Optional[tuple],
               indexed_only: bool = False) -> tuple[str, list]:
        clauses, params = [], []
        if user_id is not None:
            clauses.append("user_id = ?")
            params.append(user_id)
        if statuses is not None:
            clauses.append(f"status IN ({_placeholders(len(statuses))})")
            params.extend(statuses)
        if indexed_only:  # invariant: these statuses always have a vector (forget -> 'deleted')
            clauses.append(f"status IN ({_placeholders(len(INDEXED_STATUSES))})")
            params.extend(INDEXED_STATUSES)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _indexed_ids(self) -> List[int]:
        where, params = self._where(None, None, indexed_only=True)
        sql = f"SELECT id FROM memories{where} ORDER BY id"
        return [r[0] for r in self._connection().execute(sql, params)]

    def _read_vectors(self, ids: Sequence[int]) -> np.ndarray:
        found = {}
        for chunk in _chunks(list(ids)):
            sql = f"SELECT id, vector FROM memories WHERE id IN ({_placeholders(len(chunk))})"
            found.update((r[0], r[1]) for r in self._connection().execute(sql, chunk))
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"{self.db_path}: no memory records with ids {missing[:10]}")
        wiped = [i for i in ids if found[i] is None]
        if wiped:
            raise ValueError(f"{self.db_path}: records {wiped[:10]} were forgotten (no vector)")
        blob = b"".join(found[i] for i in ids)
        return np.frombuffer(blob, dtype=np.float32).reshape(len(ids), self.ndim).copy()

    def _index_add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        if len(ids):
            self._index.add(np.asarray(ids, dtype=np.uint64), vectors, threads=self._threads)
            self._dirty = True

    def _index_remove(self, ids: Sequence[int]) -> None:
        present = [i for i in ids if self._index is not None and self._index.contains(i)]
        for key in present:  # keep the stored bytes so the saved file can be scrubbed
            self._scrub.append(np.asarray(self._index.get(key), dtype=np.float32).tobytes())
        if present:
            self._index.remove(np.asarray(present, dtype=np.uint64))
            self._dirty = True

    # -------------------------------------------------------------------------------- add

    def _check_vectors(self, vectors: np.ndarray, n: int) -> np.ndarray:
        arr = np.asarray(vectors)
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] == 0:
            raise ValueError(f"{self.db_path}: vectors must have shape ({n}, d), got {arr.shape}")
        if arr.dtype.kind != "f":
            raise ValueError(f"{self.db_path}: vectors must be a float array, got {arr.dtype}")
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        if bad.size:
            raise ValueError(f"{self.db_path}: vectors rows {bad[:10].tolist()} are not finite")
        norms = np.linalg.norm(arr.astype(np.float64), axis=1, keepdims=True)
        zero = np.flatnonzero(norms[:, 0] == 0)
        if zero.size:
            raise ValueError(f"{self.db_path}: vectors rows {zero[:10].tolist()} are all zero")
        return (arr / norms).astype(np.float32)

    def _check_candidates(self, candidates: Sequence[MemoryCandidate]) -> None:
        for i, c in enumerate(candidates):
            if not isinstance(c, MemoryCandidate):
                raise ValueError(f"{self.db_path}: candidates[{i}] is {type(c).__name__}, "
                                 "expected MemoryCandidate")
            if not isinstance(c.text, str) or not c.text.strip():
                raise ValueError(f"{self.db_path}: candidates[{i}].text must be non-empty")
            if not isinstance(c.user_id, str) or not c.user_id:
                raise ValueError(f"{self.db_path}: candidates[{i}].user_id must be non-empty")

    def _check_encoder(self, encoder_id: str, ndim: int) -> None:
        if not isinstance(encoder_id, str) or not encoder_id:
            raise ValueError(f"{self.db_path}: encoder_id must be a non-empty string")
        if self.encoder_id is not None and self.encoder_id != encoder_id:
            raise EncoderMismatchError(
                f"{self.db_path}: database holds vectors of encoder {self.encoder_id!r}, "
                f"got encoder {encoder_id!r}")
        if self.ndim is not None and self.ndim != ndim:
            raise EncoderMismatchError(
                f"{self.db_path}: database holds {self.ndim}-d vectors (encoder "
                f"{self.encoder_id!r}), got {ndim}-d vectors (encoder {encoder_id!r})")

    def add(
        self,
        candidates: Sequence[MemoryCandidate],
        vectors: np.ndarray,
        encoder_id: str,
        *,
        status: str = "pending",
        subject_keys: Optional[Sequence[Optional[str]]] = None,
    ) -> List[int]:
        """Store candidates with their vectors in one transaction; returns the new ids."""
        candidates = list(candidates)
        vecs = self._check_vectors(vectors, len(candidates))
        self._check_candidates(candidates)
        if status not in INDEXED_STATUSES:
            raise ValueError(f"{self.db_path}: add() status must be one of {INDEXED_STATUSES}, "
                             f"got {status!r}")
        keys = [None] * len(candidates) if subject_keys is None else list(subject_keys)
        if len(keys) != len(candidates):
            raise ValueError(f"{self.db_path}: {len(keys)} subject_keys for "
                             f"{len(candidates)} candidates")
        with self._lock:
            self._check_encoder(encoder_id, vecs.shape[1])
            if not candidates:
                return []
            with self._transaction() as conn:
                self._claim_encoder(conn, encoder_id, vecs.shape[1])
                ids = self._insert_rows(conn, candidates, vecs, encoder_id, status, keys)
            self._index_new(ids, vecs)
            return ids

    def _claim_encoder(self, conn, encoder_id: str, ndim: int) -> None:
        """The first vectors stored fix the DB's encoder and width (checked by _check_encoder)."""
        if self.encoder_id is None:
            self._set_meta(conn, "encoder_id", encoder_id)
            self._set_meta(conn, "ndim", str(ndim))

    def _index_new(self, ids: Sequence[int], vecs: np.ndarray) -> None:
        if self._index is None:
            self._index = self._new_index(vecs.shape[1])
        self._index_add(ids, vecs)

    def _insert_rows(self, conn, candidates, vecs, encoder_id, status, keys) -> List[int]:
        now = _utc_now()
        ids = []
        sql = ("INSERT INTO memories (user_id, text, norm_text, status, session_id, message_index,"
               " said_at, source, created_at, updated_at, encoder_id, subject_key, vector)"
               " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")
        for c, v, key in zip(candidates, vecs, keys):
            cur = conn.execute(sql, (
                c.user_id, c.text, normalize_text(c.text), status, c.session_id,
                c.message_index, c.timestamp, c.source, now, now, encoder_id, key, v.tobytes()))
            ids.append(cur.lastrowid)
        return ids

    def add_one(self, candidate: MemoryCandidate, vector: np.ndarray, encoder_id: str, *,
                subject_key: Optional[str] = None, supersedes: Sequence[int] = (),
                superseded_by: Optional[int] = None) -> int:
        """Store one candidate and its update in ONE transaction: the records ``supersedes``
        become 'superseded' by it, and with ``superseded_by`` it is stored already superseded
        by that record. A crash leaves all of it or none of it (see memory.ingest)."""
        vecs = self._check_vectors(np.asarray(vector)[None, :], 1)
        self._check_candidates([candidate])
        olds = _as_int_ids(supersedes, "supersedes") if supersedes else []
        with self._lock:
            self._check_encoder(encoder_id, vecs.shape[1])
            with self._transaction() as conn:
                self._claim_encoder(conn, encoder_id, vecs.shape[1])
                targets = olds + ([int(superseded_by)] if superseded_by is not None else [])
                existing = self._existing(conn, targets) if targets else {}
                self._check_status_change(conn, olds, existing, "superseded", None)
                status = "pending" if superseded_by is None else "superseded"
                [new_id] = self._insert_rows(conn, [candidate], vecs, encoder_id, status, [subject_key])
                now = _utc_now()
                if superseded_by is not None:
                    conn.execute("UPDATE memories SET superseded_by = ? WHERE id = ?", (int(superseded_by), new_id))
                for chunk in _chunks(olds):
                    conn.execute(f"UPDATE memories SET status = 'superseded', superseded_by = ?, updated_at = ? "
                                 f"WHERE id IN ({_placeholders(len(chunk))})", [new_id, now, *chunk])
            self._index_new([new_id], vecs)
            return new_id

    def stored_from(self, candidate: MemoryCandidate) -> Optional[int]:
        """The id of a record (any status but 'deleted') stored from this very statement: same
        user, source, session, message, time and normalised text. A rerun after a crash, or
        a re-read of an edited session, finds what it already stored and stores nothing twice."""
        with self._lock:
            row = self._connection().execute(
                "SELECT id FROM memories WHERE user_id = ? AND norm_text = ? AND status != 'deleted' AND "
                "source = ? AND session_id IS ? AND message_index IS ? AND said_at IS ? ORDER BY id LIMIT 1",
                (candidate.user_id, normalize_text(candidate.text), candidate.source, candidate.session_id,
                 candidate.message_index, candidate.timestamp)).fetchone()
        return None if row is None else int(row[0])

    # ----------------------------------------------------------------------------- search

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        arr = np.asarray(queries)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise ValueError(f"{self.db_path}: queries must be a float (d,) or (q, d) array, "
                             f"got {arr.dtype} {np.asarray(queries).shape}")
        if self.ndim is not None and arr.shape[1] != self.ndim:
            raise EncoderMismatchError(f"{self.db_path}: database holds {self.ndim}-d vectors "
                                       f"(encoder {self.encoder_id!r}), got {arr.shape[1]}-d "
                                       "queries")
        norms = np.linalg.norm(arr.astype(np.float64), axis=1, keepdims=True)
        if not np.isfinite(arr).all() or (norms == 0).any():
            raise ValueError(f"{self.db_path}: queries must be finite and non-zero")
        return (arr / norms).astype(np.float32)

    def search(
        self,
        queries: np.ndarray,
        k: int = 5,
        *,
        user_id: Optional[str] = None,
        statuses: Iterable[str] = ("active",),
    ) -> List[List[SearchHit]]:
        """Nearest records per query (best first, at most k) among those matching the filters."""
        q = self._check_queries(queries)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{self.db_path}: k must be a positive int, got {k!r}")
        statuses = INDEXED_STATUSES if statuses is None else self._check_statuses(statuses)
        wanted = tuple(s for s in statuses if s in INDEXED_STATUSES)  # 'deleted' has no vector
        with self._lock:
            if self._index is None or not wanted or len(self._index) == 0:
                return [[] for _ in q]
            n_subset = self._subset_size(user_id, wanted)
            n_index = len(self._index)
            if n_subset == 0:
                pairs = [[] for _ in q]
            elif n_subset < n_index and (n_subset <= EXACT_SEARCH_MAX
                                         or n_subset < EXACT_SEARCH_FRACTION * n_index):
                # a small filtered subset: exact over its vectors (unfiltered goes to the index)
                pairs = self._subset_search(q, k, user_id, wanted)
            else:
                pairs = self._index_search_filtered(q, k, user_id, wanted, n_subset)
            return self._to_hits(pairs)

    def _subset_size(self, user_id: Optional[str], statuses: tuple) -> int:
        key = (user_id, statuses)
        if key not in self._subset_sizes:
            self._subset_sizes[key] = self._count(user_id, statuses, indexed_only=True)
        return self._subset_sizes[key]

    def _subset_search(self, q: np.ndarray, k: int, user_id, statuses) -> List[list]:
        """Exact search over the subset's vectors read from SQLite."""
        where, params = self._where(user_id, statuses, indexed_only=True)
        rows = self._connection().execute(f"SELECT id, vector FROM memories{where}", params)
        ids, blobs = [], []
        for r in rows:
            ids.append(r[0])
            blobs.append(r[1])
        if not ids:
            return [[] for _ in q]
        matrix = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), -1)
        return _top_k(q @ matrix.T, np.asarray(ids, dtype=np.int64), k)

    def _index_search_filtered(self, q, k: int, user_id, statuses, n_subset: int) -> List[list]:
        """Index search, post-filtered; over-fetch grows until k hits or the index is exhausted.

        Brute force (small index) ranks exactly, so its filtered top-k is exact too."""
        n_index = len(self._index)
        exact = n_index <= self._brute_force_max
        target = min(k, n_subset)
        unfiltered = n_subset == n_index  # every indexed record passes the filter
        count = min(n_index, k if unfiltered else math.ceil(2 * k * n_index / n_subset))
        results: List[Optional[list]] = [None] * len(q)
        todo = list(range(len(q)))
        while todo:
            keys, dists = self._index_search(q[todo], count, exact)
            allowed = None if unfiltered else self._filter_ids(
                set(np.concatenate(keys).tolist()), user_id, statuses)
            still = []
            for j, qi in enumerate(todo):
                pairs = [(int(key), 1.0 - float(d)) for key, d in zip(keys[j], dists[j])
                         if allowed is None or int(key) in allowed][:k]
                if len(pairs) >= target:
                    results[qi] = pairs
                elif count >= n_index:  # HNSW could not reach enough: exact over the subset
                    results[qi] = self._subset_search(q[qi:qi + 1], k, user_id, statuses)[0]
                else:
                    still.append(qi)
            todo, count = still, min(n_index, count * 4)
        return results

    def _index_search(self, q: np.ndarray, count: int, exact: bool) -> tuple[list, list]:
        """Per query: found keys (int64) and cosine distances, best first."""
        m = self._index.search(q, count, threads=self._threads, exact=exact)
        if isinstance(m, Matches):  # usearch returns Matches for a single query
            return [m.keys.astype(np.int64)], [m.distances]
        return ([m.keys[j][:m.counts[j]].astype(np.int64) for j in range(len(q))],
                [m.distances[j][:m.counts[j]] for j in range(len(q))])

    def _filter_ids(self, ids: set, user_id, statuses) -> set:
        ids = sorted(ids)
        where, params = self._where(user_id, statuses, indexed_only=True)
        allowed = set()
        for chunk in _chunks(ids):
            sql = f"SELECT id FROM memories{where} AND id IN ({_placeholders(len(chunk))})"
            allowed.update(r[0] for r in self._connection().execute(sql, params + list(chunk)))
        return allowed

    def _to_hits(self, pairs: List[list]) -> List[List[SearchHit]]:
        ids = sorted({i for per_query in pairs for i, _ in per_query})
        by_id = {r.id: r for r in self._fetch_records(ids)}
        return [[SearchHit(by_id[i], s) for i, s in per_query] for per_query in pairs]

    # ---------------------------------------------------------------------------- reading

    def _fetch_records(self, ids: Sequence[int]) -> List[MemoryRecord]:
        out = []
        for chunk in _chunks(list(ids)):
            sql = f"SELECT {_COLUMNS} FROM memories WHERE id IN ({_placeholders(len(chunk))})"
            out.extend(_row_to_record(r) for r in self._connection().execute(sql, chunk))
        return out

    def get(self, id: int) -> MemoryRecord:
        with self._lock:
            found = self._fetch_records([int(id)])
        if not found:
            raise KeyError(f"{self.db_path}: no memory record with id {id}")
        return found[0]

    def records(self, *, user_id: Optional[str] = None,
                statuses: Optional[Iterable[str]] = None) -> List[MemoryRecord]:
        where, params = self._where(user_id, self._check_statuses(statuses))
        with self._lock:
            rows = self._connection().execute(
                f"SELECT {_COLUMNS} FROM memories{where} ORDER BY id", params).fetchall()
        return [_row_to_record(r) for r in rows]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored (normalised) vectors in the order of ``ids``; shape (len(ids), ndim)."""
        ids = _as_int_ids(ids)
        with self._lock:
            if not ids:
                return np.zeros((0, self.ndim or 0), dtype=np.float32)
            return self._read_vectors(ids)

    def find_by_text(self, user_id: str, normalized_text: str,
                     statuses: Iterable[str] = ("pending", "active")) -> Optional[MemoryRecord]:
        """Oldest record of ``user_id`` whose normalised text equals ``normalized_text``."""
        where, params = self._where(user_id, self._check_statuses(statuses))
        sql = f"SELECT {_COLUMNS} FROM memories{where} AND norm_text = ? ORDER BY id LIMIT 1"
        with self._lock:
            row = self._connection().execute(
                sql, params + [normalize_text(normalized_text)]).fetchone()
        return None if row is None else _row_to_record(row)

    def count(self, *, user_id: Optional[str] = None,
              statuses: Optional[Iterable[str]] = None) -> int:
        return self._count(user_id, self._check_statuses(statuses))

    def _count(self, user_id: Optional[str], statuses: Optional[tuple],
               indexed_only: bool = False) -> int:
        where, params = self._where(user_id, statuses, indexed_only)
        with self._lock:
            return self._connection().execute(
                f"SELECT COUNT(*) FROM memories{where}", params).fetchone()[0]

    # --------------------------------------------------------------------------- mutating

    def _existing(self, conn, ids: Sequence[int]) -> dict:
        """id -> (status, has_vector); KeyError naming the missing ids."""
        found = {}
        for chunk in _chunks(list(ids)):
            sql = (f"SELECT id, status, vector IS NOT NULL FROM memories "
                   f"WHERE id IN ({_placeholders(len(chunk))})")
            found.update((r[0], (r[1], bool(r[2]))) for r in conn.execute(sql, chunk))
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"{self.db_path}: no memory records with ids {missing[:10]}")
        return found

    def set_status(self, ids: Iterable[int], status: str, *,
                   superseded_by: Optional[int] = None) -> None:
        """Change status; 'deleted' drops the vector from the index (SQLite keeps it)."""
        ids = _as_int_ids(ids)
        self._check_statuses((status,))
        if superseded_by is not None and status != "superseded":
            raise ValueError(f"{self.db_path}: superseded_by given with status {status!r}")
        with self._lock:
            with self._transaction() as conn:
                existing = self._existing(conn, ids)
                self._check_status_change(conn, ids, existing, status, superseded_by)
                for chunk in _chunks(ids):
                    conn.execute(
                        f"UPDATE memories SET status = ?, superseded_by = ?, updated_at = ? "
                        f"WHERE id IN ({_placeholders(len(chunk))})",
                        [status, superseded_by, _utc_now(), *chunk])
            if status not in INDEXED_STATUSES:
                self._index_remove(ids)
                return
            add = [i for i in ids if existing[i][0] not in INDEXED_STATUSES]
            if add:
                self._index_add(add, self._read_vectors(add))

    def _check_status_change(self, conn, ids, existing, status, superseded_by) -> None:
        if superseded_by is not None:
            self._existing(conn, [int(superseded_by)])
        wiped = [i for i in ids if status in INDEXED_STATUSES and not existing[i][1]]
        if wiped:
            raise ValueError(f"{self.db_path}: records {wiped[:10]} were forgotten; "
                             f"cannot set status {status!r}")

    def set_cues(self, id: int, cues: Sequence[str]) -> None:
        cues = list(cues)
        if not all(isinstance(c, str) for c in cues):
            raise ValueError(f"{self.db_path}: cues for record {id} must be strings, got {cues!r}")
        with self._lock, self._transaction() as conn:
            self._existing(conn, [int(id)])
            conn.execute("UPDATE memories SET cues = ?, updated_at = ? WHERE id = ?",
                         (json.dumps(cues, ensure_ascii=False), _utc_now(), int(id)))

    def forget(self, ids: Iterable[int]) -> None:
        """Erase records: vector out of the index, text/cues/vector wiped in SQLite (row kept
        as 'deleted' so ids are never reused).  Saves the index and checkpoints the WAL at once
        so the erased content does not linger on disk. Each erased text leaves a tombstone
        (``forgotten_keys``: hashes, not the text) that ``is_forgotten`` checks."""
        ids = _as_int_ids(ids)
        with self._lock:
            with self._transaction() as conn:
                self._existing(conn, ids)
                for chunk in _chunks(ids):
                    rows = conn.execute(f"SELECT user_id, text FROM memories WHERE id IN ({_placeholders(len(chunk))})"
                                        f" AND text != ''", chunk).fetchall()
                    conn.executemany("INSERT OR IGNORE INTO forgotten VALUES (?, ?, ?)",
                                     [(user, key, _utc_now()) for user, text in rows for key in forgotten_keys(text)])
                for chunk in _chunks(ids):
                    conn.execute(
                        f"UPDATE memories SET status = 'deleted', text = '', norm_text = '', "
                        f"cues = '[]', vector = NULL, updated_at = ? "
                        f"WHERE id IN ({_placeholders(len(chunk))})", [_utc_now(), *chunk])
            self._index_remove(ids)
            self.flush()
            self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def is_forgotten(self, user_id: str, text: str) -> bool:
        """Whether ``text`` (or the same words in another order or case) was forgotten for ``user_id``."""
        keys = forgotten_keys(text)
        with self._lock:
            row = self._connection().execute(
                f"SELECT 1 FROM forgotten WHERE user_id = ? AND key IN ({_placeholders(len(keys))}) LIMIT 1",
                [user_id, *keys]).fetchone()
        return row is not None

    def unforget(self, user_id: str, text: str) -> None:
        """Drop the tombstones of ``text``: the user adds it again explicitly."""
        keys = forgotten_keys(text)
        with self._lock, self._transaction() as conn:
            conn.execute(f"DELETE FROM forgotten WHERE user_id = ? AND key IN ({_placeholders(len(keys))})",
                         [user_id, *keys])

    # ------------------------------------------------------------------ session bookkeeping

    def session_state(self, session_id: str) -> Optional[str]:
        """Content hash recorded when ``session_id`` was last processed, or None."""
        with self._lock:
            row = self._connection().execute(
                "SELECT content_hash FROM processed_sessions WHERE session_id = ?",
                (session_id,)).fetchone()
        return None if row is None else row[0]

    def mark_session_processed(self, session_id: str, content_hash: str,
                               source_path: Optional[str], n_candidates: int) -> None:
        if not session_id or not content_hash:
            raise ValueError(f"{self.db_path}: session_id and content_hash must be non-empty")
        with self._lock, self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO processed_sessions VALUES (?, ?, ?, ?, ?)",
                (session_id, content_hash, None if source_path is None else os.fspath(source_path),
                 int(n_candidates), _utc_now()))

    # ------------------------------------------------------------------------- persistence

    def flush(self) -> None:
        """Save the index if it changed: reconcile its keys with SQLite (another process may
        have forgotten or added records), compact it when entries were removed, write a temp
        file, zero removed vectors' bytes in it, hash it into meta, os.replace."""
        with self._lock:
            if self._index is None:
                return
            self._repair_keys("reconciled with")
            if not self._dirty:
                return
            if self._scrub and len(self._index) <= COMPACT_MAX:
                self._index = self._compacted()
            tmp = f"{self.index_path}.tmp.{os.getpid()}"
            self._index.save(tmp)
            dead = self._dead_patterns()
            if dead:
                logger.info("%s: zeroed %d removed vectors in the saved index",
                            self.index_path, _scrub_file(tmp, dead))
            os.chmod(tmp, 0o600)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            with self._transaction() as conn:
                self._set_meta(conn, "index_sha256", _sha256_file(tmp))
            os.replace(tmp, self.index_path)
            _fsync_dir(self.directory)
            self._dirty = False
            # self._scrub is kept: the index in memory still holds those bytes, and every later
            # save must zero them again, until a rebuild or compaction drops them

    def _compacted(self) -> Index:
        """A fresh index holding only the live entries: removed ones leave no bytes behind."""
        keys = np.asarray(self._index.keys[:], dtype=np.uint64)
        index = self._new_index(self._index.ndim)
        if keys.size:
            index.add(keys, np.asarray(self._index.get(keys), dtype=np.float32), threads=self._threads)
        logger.info("%s: compacted the index (%d live vectors, %d removed)", self.index_path, keys.size,
                    len(self._scrub))
        self._scrub = []
        return index

    def snapshot(self, destination: str | os.PathLike) -> List[str]:
        """A consistent copy of this DB in ``destination`` (a new directory): the SQLite
        file through the online backup API and the saved index (flushed first). Returns
        the file names written."""
        dest = os.fspath(destination)
        with self._lock:
            self.flush()
            os.makedirs(dest, mode=0o700, exist_ok=False)
            target = sqlite3.connect(os.path.join(dest, DB_FILENAME))
            try:
                self._connection().backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
            finally:
                target.close()
            written = [DB_FILENAME]
            if os.path.exists(self.index_path):
                shutil.copyfile(self.index_path, os.path.join(dest, INDEX_FILENAME))
                written.append(INDEX_FILENAME)
            for name in written:
                os.chmod(os.path.join(dest, name), 0o600)
                with open(os.path.join(dest, name), "rb+") as f:
                    os.fsync(f.fileno())
            _fsync_dir(dest)
        return written

    def _dead_patterns(self) -> List[bytes]:
        """Removed vectors' bytes that no live entry holds: zeroing a pattern that a live
        entry (a duplicate, or a record re-activated since) also holds would corrupt it."""
        patterns = list(dict.fromkeys(self._scrub))
        if not patterns or len(self._index) == 0:
            return patterns
        q = np.frombuffer(b"".join(patterns), dtype=np.float32).reshape(len(patterns), -1)
        keys, dists = self._index_search(q, 8, exact=True)
        live = set()
        for pattern, found, dist in zip(patterns, keys, dists):
            for key in found[dist <= 1e-6]:
                if np.asarray(self._index.get(int(key)), np.float32).tobytes() == pattern:
                    live.add(pattern)
        return [p for p in patterns if p not in live]

    def close(self) -> None:
        with self._lock:
            if self._conn is None:
                return
            try:
                self.flush()
            finally:
                self._conn.close()
                self._conn = None
                self._index = None

    def __enter__(self) -> "MemoryVectorDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> List[list]:
    """Best-first (id, score) pairs per row of ``scores`` (q, n); ties broken by lower id."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    out = []
    for row, cols in zip(scores, part):
        order = np.lexsort((ids[cols], -row[cols]))
        out.append([(int(ids[cols[o]]), float(row[cols[o]])) for o in order])
    return out
