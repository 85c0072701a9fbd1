"""Put candidate facts into the memory DB: de-duplicate, apply the update rule, record provenance.

For each candidate, oldest first:
1. **exact duplicate**: same user, same normalised text as a pending/active memory -> skipped;
2. **near duplicate**: same content words (``allergic to peanuts`` / ``is allergic to
   peanuts``), or memory-vector cosine >= ``near_duplicate_cosine`` *and* most content
   words shared -> skipped;
3. **update**: a pending/active memory of the same user with the same subject key
   (``memory.subjects``) is marked ``superseded`` by the newer one, never deleted. A
   candidate older than the memory it clashes with is stored as already superseded.
4. otherwise it is added as ``pending`` (trained and published later).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Dict, FrozenSet, List, Sequence

import numpy as np

from memory.grounding import content_words
from memory.schema import MemoryCandidate
from memory.secrets import log_filtered
from memory.subjects import subject_key
from memory.vector_db import MemoryRecord, MemoryVectorDB, normalize_text

logger = logging.getLogger(__name__)
LIVE = ("pending", "active")


@dataclasses.dataclass
class IngestReport:
    added: List[int] = dataclasses.field(default_factory=list)
    duplicate_exact: int = 0
    duplicate_near: int = 0
    superseded: int = 0
    secrets: Dict[str, int] = dataclasses.field(default_factory=dict)  # dropped, by secret type
    events: List[dict] = dataclasses.field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        return {"added": len(self.added), "duplicate_exact": self.duplicate_exact,
                "duplicate_near": self.duplicate_near, "superseded": self.superseded,
                "secret_filtered": sum(self.secrets.values())}


def _jaccard(a: FrozenSet[str], b: FrozenSet[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


class _UserView:
    """The live memories of one user, kept current while a batch is ingested."""

    def __init__(self, db: MemoryVectorDB, user_id: str):
        self.records: Dict[int, MemoryRecord] = {r.id: r for r in db.records(user_id=user_id, statuses=LIVE)}

    def same_words(self, words: FrozenSet[str]):
        return next((r for r in self.records.values() if frozenset(content_words(r.text)) == words), None)

    def same_subject(self, key: str) -> List[MemoryRecord]:
        return [r for r in self.records.values() if r.subject_key == key]


def ingest_candidates(db: MemoryVectorDB, candidates: Sequence[MemoryCandidate], vectorizer, *,
                      near_duplicate_cosine: float = 0.97, near_duplicate_jaccard: float = 0.6,
                      secret_filter=None) -> IngestReport:
    """Store ``candidates`` (de-duplicated, update rule applied). With a ``secret_filter``
    (memory.secrets), a candidate holding a password, key, card number, IBAN or private key is
    dropped before it is embedded or stored; ``report.secrets`` counts them by type."""
    report = IngestReport()
    if secret_filter is not None:
        counts: collections.Counter = collections.Counter()
        candidates = [c for c in candidates if secret_filter.keep(c.text, counts)]
        report.secrets = dict(counts)
        log_filtered(counts, "memories")
        report.events += [{"event": "secret_filtered", "types": sorted(counts)}] if counts else []
    if not candidates:
        return report
    ordered = sorted(candidates, key=lambda c: (c.timestamp or "", c.message_index or 0))
    vectors = np.asarray(vectorizer.encode([c.text for c in ordered]), dtype=np.float32)
    views: Dict[str, _UserView] = {}
    for cand, vec in zip(ordered, vectors):
        view = views.setdefault(cand.user_id, _UserView(db, cand.user_id))
        if _is_duplicate(db, view, cand, vec, report, near_duplicate_cosine, near_duplicate_jaccard):
            continue
        _add_with_update_rule(db, view, cand, vec, vectorizer.encoder_id, report)
    return report


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
    key = subject_key(cand.text)
    # facts of one message do not update each other: "I sold my car and don't have one any more"
    # gives two facts on the subject, both true at once
    older = [r for r in view.same_subject(key) if not _same_message(r, cand)] if key else []
    [new_id] = db.add([cand], vec[None, :], encoder_id, status="pending", subject_keys=[key])
    report.added.append(new_id)
    for old in older:
        if (old.said_at or "") <= (cand.timestamp or ""):
            db.set_status([old.id], "superseded", superseded_by=new_id)
            view.records.pop(old.id, None)
            report.events.append({"event": "superseded", "old": old.id, "old_text": old.text,
                                  "new": new_id, "text": cand.text})
        else:  # an older statement arriving late: it loses to the newer memory
            db.set_status([new_id], "superseded", superseded_by=old.id)
            report.events.append({"event": "superseded", "old": new_id, "new": old.id, "text": cand.text})
            report.superseded += 1
            return
        report.superseded += 1
    view.records[new_id] = db.get(new_id)
