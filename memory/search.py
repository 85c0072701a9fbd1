"""Search callbacks for ``recall.generation.RecallEngine`` over a memory DB's active memories.

- ``db_search``: the ``<recall>`` query's cosine to each memory vector (the DB's index);
- ``FusedSearch`` (``retrieval="fused"``): the same cosines, and a sentence encoder's cosines
  between the user's turn and each memory's text, each standardised over the user's memories
  (z-scores) and added with equal weight; the memories come back in that order. Each hit's
  ``score`` stays its ``<recall>`` cosine, so the recall threshold (step 1's learned "no memory"
  level) still decides *whether* a turn recalls, and the fused order decides *which* memory.
  The encoder's vectors of the memories are computed once per search object (a chat session,
  an evaluation) and kept.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from recall.generation import Hit

RETRIEVALS = ("recall", "fused")


def db_search(db, user_id: Optional[str], top_k: int = 3):
    """A search callback over a ``MemoryVectorDB``'s active memories of ``user_id``."""
    def search(queries):
        results = db.search(queries, k=top_k, user_id=user_id, statuses=("active",))
        out = []
        for hits in results:
            vectors = db.vectors([h.record.id for h in hits]) if hits else []
            out.append([Hit(h.record.id, float(h.score), h.record.text, v) for h, v in zip(hits, vectors)])
        return out

    return search


def _standardised(scores: np.ndarray) -> np.ndarray:
    """Each row as z-scores over its columns (a row of one memory is all zeros)."""
    return (scores - scores.mean(1, keepdims=True)) / (scores.std(1, keepdims=True) + 1e-6)


class FusedSearch:
    """``<recall>`` and a sentence encoder, ranked together (see the module docstring)."""

    reads_texts = True  # RecallEngine.probe passes the user's turns

    def __init__(self, db, user_id: Optional[str], encoder, top_k: int = 3):
        self.db, self.user_id, self.encoder, self.top_k = db, user_id, encoder, top_k
        self._bank: Optional[tuple] = None

    def bank(self):
        """(records, unit memory vectors, encoder vectors of their texts), read once."""
        if self._bank is None:
            records = self.db.records(user_id=self.user_id, statuses=("active",))
            keys = self.db.vectors([r.id for r in records]) if records else np.zeros((0, 0), np.float32)
            if len(records):
                keys = keys / np.linalg.norm(keys, axis=1, keepdims=True).clip(1e-12)
            texts = self.encoder.encode([r.text for r in records]) if records else None
            self._bank = (records, keys, texts)
        return self._bank

    def scores(self, queries: np.ndarray, texts: Sequence[str]) -> Dict[str, np.ndarray]:
        """(queries x memories) cosines of ``<recall>`` and of the encoder, and their fusion."""
        records, keys, encoded = self.bank()
        recall = np.asarray(queries, np.float32) @ keys.T
        encoder = self.encoder.encode(list(texts)) @ encoded.T
        return {"recall": recall, "encoder": encoder, "fused": _standardised(recall) + _standardised(encoder)}

    def __call__(self, queries: np.ndarray, texts: Optional[Sequence[str]] = None) -> List[List[Hit]]:
        if texts is None:  # a recall the model asked for mid-answer: no turn to read, <recall> alone
            return db_search(self.db, self.user_id, self.top_k)(queries)
        records, _, _ = self.bank()
        if not records:
            return [[] for _ in range(len(queries))]
        s = self.scores(queries, texts)
        out = []
        for recall, fused in zip(s["recall"], s["fused"]):
            order = list(np.argsort(-fused, kind="stable")[:self.top_k])
            best = int(np.argmax(recall))
            if best not in order:  # the memory whose <recall> cosine decides whether to recall, last
                order.append(best)
            vectors = self.db.vectors([records[i].id for i in order])
            out.append([Hit(records[i].id, float(recall[i]), records[i].text, v) for i, v in zip(order, vectors)])
        return out


def make_search(db, user_id: Optional[str], top_k: int = 3, retrieval: str = "recall", encoder=None):
    """The search callback ``retrieval`` names (``RETRIEVALS``); ``fused`` loads all-MiniLM-L6-v2
    unless an ``encoder`` is given."""
    if retrieval not in RETRIEVALS:
        raise ValueError(f"retrieval: expected one of {RETRIEVALS}, got {retrieval!r}")
    if retrieval == "recall":
        return db_search(db, user_id, top_k)
    if encoder is None:
        from memory.vectors import SentenceEncoderVectorizer

        encoder = SentenceEncoderVectorizer("minilm")
    return FusedSearch(db, user_id, encoder, top_k)
