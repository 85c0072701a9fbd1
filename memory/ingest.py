"""Put candidate facts into the memory DB: de-duplicate, apply the update rule, record provenance.

For each candidate, oldest first:
1. **exact duplicate**: same user, same normalised text as a pending/active memory -> skipped;
2. **near duplicate**: same content words (``allergic to peanuts`` / ``is allergic to
   peanuts``), or memory-vector cosine >= ``near_duplicate_cosine`` *and* most content
   words shared -> skipped;
3. **update**: a pending/active memory of the same user that the candidate replaces
   (``memory.updates.supersedes``: same owner, and a functional relation with a new value, a
   correction, a change verb, a plan's outcome or a flipped negation) is marked ``superseded``
   by the newer one, never deleted. A candidate older than the memory it clashes with is
   stored as already superseded.
4. otherwise it is added as ``pending`` (trained and published later).

Timestamps are guarded before they order anything: one in the future (a wrong clock, a typo
like 2099) is clamped to the time of the ingest, and one earlier than the message before it in
the same session is clamped to that message's; each clamp is logged with its session.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import logging
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from memory.grounding import content_words
from memory.runs import check_stop
from memory.schema import MemoryCandidate
from memory.secrets import log_filtered
from memory.updates import subject_key, supersedes
from memory.vector_db import MemoryRecord, MemoryVectorDB, normalize_text

logger = logging.getLogger(__name__)
LIVE = ("pending", "active")


@dataclasses.dataclass
class IngestReport:
    added: List[int] = dataclasses.field(default_factory=list)
    duplicate_exact: int = 0
    duplicate_near: int = 0
    superseded: int = 0
    forgotten: int = 0  # candidates the user had forgotten before (tombstones), not stored again
    already_stored: int = 0  # statements stored by an earlier read of the same session
    secrets: Dict[str, int] = dataclasses.field(default_factory=dict)  # dropped, by secret type
    events: List[dict] = dataclasses.field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        return {"added": len(self.added), "duplicate_exact": self.duplicate_exact,
                "duplicate_near": self.duplicate_near, "superseded": self.superseded, "forgotten": self.forgotten,
                "already_stored": self.already_stored,
                "secret_filtered": sum(self.secrets.values())}


def _jaccard(a: FrozenSet[str], b: FrozenSet[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


class _UserView:
    """The live memories of one user, kept current while a batch is ingested."""

    def __init__(self, db: MemoryVectorDB, user_id: str):
        self.records: Dict[int, MemoryRecord] = {r.id: r for r in db.records(user_id=user_id, statuses=LIVE)}

    def same_words(self, words: FrozenSet[str]):
        return next((r for r in self.records.values() if frozenset(content_words(r.text)) == words), None)

    def replaced_by(self, text: str) -> List[Tuple[MemoryRecord, str]]:
        """(memory, why) for each live memory that ``text`` replaces (``memory.updates.supersedes``)."""
        return [(r, why) for r in self.records.values() for why in [supersedes(r.text, text)] if why]


def ingest_candidates(db: MemoryVectorDB, candidates: Sequence[MemoryCandidate], vectorizer, *,
                      near_duplicate_cosine: float = 0.97, near_duplicate_jaccard: float = 0.6,
                      secret_filter=None, finish: Optional[Callable[[], None]] = None) -> IngestReport:
    """Store ``candidates`` (de-duplicated, update rule applied). With a ``secret_filter``
    (memory.secrets), a candidate holding a password, key, card number, IBAN or private key is
    dropped before it is embedded or stored; ``report.secrets`` counts them by type.

    Everything is stored in ONE transaction (``MemoryVectorDB.batch``), together with what
    ``finish`` writes (the caller's bookkeeping: the sessions marked processed). A crash or a
    kill -9 leaves the DB as it was, and the rerun stores exactly what an uninterrupted run
    would have. A statement stored before (``MemoryVectorDB.stored_from``: an edited session
    read again) is not stored twice. Candidates are encoded before the transaction starts,
    so other writers (``python -m memory forget``) wait only for the writes."""
    report = IngestReport()
    if secret_filter is not None:
        counts: collections.Counter = collections.Counter()
        candidates = [c for c in candidates if secret_filter.keep(c.text, counts)]
        report.secrets = dict(counts)
        log_filtered(counts, "memories")
        report.events += [{"event": "secret_filtered", "types": sorted(counts)}] if counts else []
    candidates = [c for c in candidates if _not_stored_or_forgotten(db, c, report)]
    ordered = sorted(clamp_timestamps(candidates), key=lambda c: (c.timestamp or "", c.message_index or 0))
    chunks = []
    for i in range(0, len(ordered), 256):  # a stop request (SIGTERM) is honoured between chunks
        check_stop("storing memories")
        chunks.append(np.asarray(vectorizer.encode([c.text for c in ordered[i:i + 256]]), dtype=np.float32))
    vectors = np.concatenate(chunks) if ordered else []
    with db.batch():
        views: Dict[str, _UserView] = {}
        for cand, vec in zip(ordered, vectors):
            if not _not_stored_or_forgotten(db, cand, report):  # forgotten since it was read
                continue
            if cand.source == "manual":  # the user adds it again: the tombstone goes
                db.unforget(cand.user_id, cand.text)
            view = views.setdefault(cand.user_id, _UserView(db, cand.user_id))
            if _is_duplicate(db, view, cand, vec, report, near_duplicate_cosine, near_duplicate_jaccard):
                continue
            _add_with_update_rule(db, view, cand, vec, vectorizer.encoder_id, report)
        if finish is not None:
            finish()
    return report


def _not_stored_or_forgotten(db: MemoryVectorDB, cand: MemoryCandidate, report: IngestReport) -> bool:
    """False (counted) for a statement already stored, or a fact the user forgot: it stays
    forgotten unless they add it themselves."""
    if cand.source != "manual" and db.stored_from(cand) is not None:
        report.already_stored += 1
        return False
    if cand.source != "manual" and db.is_forgotten(cand.user_id, cand.text):
        report.forgotten += 1
        report.events.append({"event": "forgotten", "session_id": cand.session_id,
                              "message_index": cand.message_index})
        return False
    return True


def clamp_timestamps(candidates: Sequence[MemoryCandidate], now: Optional[str] = None) -> List[MemoryCandidate]:
    """The candidates with guarded timestamps (see the module docstring); the rest unchanged."""
    now = now or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    out: List[MemoryCandidate] = []
    last: Dict[str, tuple] = {}  # session -> (message index, timestamp) of the latest message seen
    for cand in sorted(candidates, key=lambda c: (c.session_id or "", c.message_index or 0)):
        ts = cand.timestamp
        if ts and ts > now:
            logger.warning("session %s: timestamp %s is in the future; read as %s", cand.session_id, ts, now)
            ts = now
        index = cand.message_index or 0
        prev = last.get(cand.session_id) if cand.session_id else None
        if ts and prev and index > prev[0] and ts < prev[1]:
            logger.warning("session %s: timestamp %s is earlier than the message before it; read as %s",
                           cand.session_id, ts, prev[1])
            ts = prev[1]
        if ts and cand.session_id and (prev is None or index > prev[0]):
            last[cand.session_id] = (index, ts)
        out.append(cand if ts == cand.timestamp else dataclasses.replace(cand, timestamp=ts))
    return out


def _is_duplicate(db, view, cand, vec, report, cos_threshold, jaccard_threshold) -> bool:
    if db.find_by_text(cand.user_id, normalize_text(cand.text), statuses=LIVE):
        report.duplicate_exact += 1
        report.events.append({"event": "duplicate_exact", "text": cand.text})
        return True
    words = frozenset(content_words(cand.text))
    twin = view.same_words(words) if words else None
    if twin is None and view.records:
        hits = db.search(vec, k=3, user_id=cand.user_id, statuses=LIVE)[0]
        twin = next((h.record for h in hits if h.score >= cos_threshold and
                     _jaccard(words, frozenset(content_words(h.record.text))) >= jaccard_threshold), None)
    if twin is None:
        return False
    report.duplicate_near += 1
    report.events.append({"event": "duplicate_near", "text": cand.text, "of": twin.id})
    return True


def _same_message(record, cand) -> bool:
    return (record.session_id is not None and record.message_index is not None
            and (record.session_id, record.message_index, record.said_at or "")
            == (cand.session_id, cand.message_index, cand.timestamp or ""))


def _add_with_update_rule(db, view, cand, vec, encoder_id, report) -> None:
    """Store ``cand``; the live memories it replaces become superseded by it, in the same
    transaction (``MemoryVectorDB.add_one``). An older statement arriving late loses to the
    newer memory and is stored already superseded."""
    # facts of one message do not update each other: "I sold my car and don't have one any more"
    # gives two facts on the subject, both true at once; a correction does ("it's 520, no wait,
    # 540 since March": "..., not 520")
    older = [r for r, why in view.replaced_by(cand.text) if not _same_message(r, cand) or why == "a correction"]
    older = [r for r in older if db.get(r.id).status in LIVE]  # a view read before a forget: gone, not replaced
    replaced, newer = [], None
    for old in older:
        if (old.said_at or "") <= (cand.timestamp or ""):
            replaced.append(old)
        else:
            newer = old
            break
    new_id = db.add_one(cand, vec, encoder_id, subject_key=subject_key(cand.text),
                        supersedes=[r.id for r in replaced], superseded_by=None if newer is None else newer.id)
    report.added.append(new_id)
    for old in replaced:
        view.records.pop(old.id, None)
        report.events.append({"event": "superseded", "old": old.id, "old_text": old.text,
                              "new": new_id, "text": cand.text})
    report.superseded += len(replaced) + (newer is not None)
    if newer is not None:
        report.events.append({"event": "superseded", "old": new_id, "new": newer.id, "text": cand.text})
    else:
        view.records[new_id] = db.get(new_id)
