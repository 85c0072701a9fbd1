"""Score extracted facts against annotated expected facts (``expected_facts.json`` of a data set).

Matching rule: an extracted fact matches an expected fact when both come from the same
session and the extracted text contains every keyword of the expected fact
(case-insensitive substring). Recall = expected facts matched; precision = extracted
facts that match some expected fact.

Also measured, without any word list drawn from a data set:
- **junk**: a stored memory that is not a self-contained fact: it keeps chat filler ("lol",
  "haha"), an unresolved reference (he, she, it, this, there...), or it came from a message
  the data set marks as noise and matches no expected fact;
- **the update rule alone**: the annotated facts themselves, stored in the order they were said
  (``annotated_candidates``), scored like extracted ones; extraction misses cannot lower it;
- **updates**: after the update rule (``memory.ingest``), a supersession of memory A by
  memory B is correct when A matches an expected fact that a fact B matches supersedes
  (directly or through a chain); update recall is the share of expected supersessions whose
  old and new facts were both stored and linked so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from memory.schema import ChatSession, MemoryCandidate

FILLER = re.compile(r"\b(?:lol|lmao|haha+|hehe+|omg|ugh+|xd|tbh|idk)\b|[:;]-?[)(dp]\B", re.I)
# a reference that needs the text around it: third-person pronouns, demonstratives standing alone,
# "there" that is a place (not "there is")
REFERENCE = re.compile(r"\b(?:he|she|him|her|his|hers|it|its)\b|\b(?:this|these|those)\b(?!\s+\w+)"
                       r"|\bthere\b(?!\s+(?:is|are|was|were|will|has|have)\b|'s\b)", re.I)


def load_expected(path) -> List[dict]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for i, item in enumerate(data):
        for key in ("session_id", "keywords", "fact"):
            if key not in item:
                raise ValueError(f"{path}: [{i}].{key}: missing")
    return data


def load_noise(path) -> List[dict]:
    """``noise.json`` beside a data set's expected facts, or [] when it has none."""
    file = Path(path)
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else []


def matches(text: str, expected: dict) -> bool:
    low = text.lower()
    return all(k.lower() in low for k in expected["keywords"])


def score_extraction(facts: Sequence[MemoryCandidate], expected: Sequence[dict]) -> Dict[str, float]:
    by_session: Dict[str, List[dict]] = {}
    for e in expected:
        by_session.setdefault(e["session_id"], []).append(e)
    found = sum(any(matches(f.text, e) for f in facts if f.session_id == e["session_id"])
                for e in expected)
    correct = sum(any(matches(f.text, e) for e in by_session.get(f.session_id, [])) for f in facts)
    return {
        "recall": found / len(expected) if expected else 0.0,
        "precision": correct / len(facts) if facts else 0.0,
        "n_facts": len(facts),
        "n_expected": len(expected),
    }


def recall_by_kind(facts: Sequence[MemoryCandidate], expected: Sequence[dict]) -> Dict[str, dict]:
    """Recall per annotated ``kind`` tag (an item with several tags counts in each)."""
    out: Dict[str, dict] = {}
    for e in expected:
        hit = any(matches(f.text, e) for f in facts if f.session_id == e["session_id"])
        for kind in e.get("kind", ["plain"]):
            row = out.setdefault(kind, {"n": 0, "found": 0})
            row["n"] += 1
            row["found"] += int(hit)
    return {k: {**v, "recall": v["found"] / v["n"]} for k, v in sorted(out.items())}


def junk_reason(fact: MemoryCandidate, expected: Sequence[dict], noise: Sequence[dict]) -> Optional[str]:
    """Why a stored memory is not a self-contained fact, or None."""
    if FILLER.search(fact.text):
        return "filler"
    if REFERENCE.search(fact.text):
        return "unresolved reference"
    noisy = {(n["session_id"], n["message_index"]) for n in noise}
    if (fact.session_id, fact.message_index) in noisy and not any(
            matches(fact.text, e) for e in expected if e["session_id"] == fact.session_id):
        return "from a noise message"
    return None


def junk(facts: Sequence[MemoryCandidate], expected: Sequence[dict], noise: Sequence[dict]) -> List[dict]:
    return [{"text": f.text, "session_id": f.session_id, "reason": r} for f in facts
            for r in [junk_reason(f, expected, noise)] if r]


def _supersedes_chain(expected: Sequence[dict]) -> Dict[str, set]:
    """expected id -> the ids it replaces, directly or through a chain."""
    by_id = {e["id"]: e for e in expected}
    out: Dict[str, set] = {}
    for e in expected:
        seen, cur = set(), e
        while cur.get("supersedes") and cur["supersedes"] not in seen:
            seen.add(cur["supersedes"])
            cur = by_id.get(cur["supersedes"], {})
        out[e["id"]] = seen
    return out


def score_updates(records: Sequence, expected: Sequence[dict]) -> Dict[str, object]:
    """Update precision and recall from the DB's records (``MemoryRecord`` with ``status`` and
    ``superseded_by``) against the expected ``supersedes`` links (see the module docstring)."""
    chain = _supersedes_chain(expected)
    by_id = {r.id: r for r in records}

    def items(record) -> List[dict]:
        return [e for e in expected if e.get("user_id", record.user_id) == record.user_id
                and e["session_id"] == record.session_id and matches(record.text, e)]

    events = [(r, by_id.get(r.superseded_by)) for r in records if r.status == "superseded" and r.superseded_by]
    correct = [(old, new) for old, new in events if new is not None and any(
        o["id"] in chain[n["id"]] for o in items(old) for n in items(new))]
    wanted = [(e, old) for e in expected if e.get("supersedes")
              for old in [next(x for x in expected if x["id"] == e["supersedes"])]]
    found = 0
    for e_new, e_old in wanted:
        olds = [r for r in records if r.session_id == e_old["session_id"] and matches(r.text, e_old)]
        if any(r.status == "superseded" and r.superseded_by in by_id
               and any(e_new["id"] == n["id"] or e_old["id"] in chain[n["id"]] for n in items(by_id[r.superseded_by]))
               for r in olds):
            found += 1
    return {"events": len(events), "correct": len(correct), "expected": len(wanted),
            "precision": len(correct) / len(events) if events else None,
            "recall": found / len(wanted) if wanted else None,
            "wrong": [{"old": o.text, "new": n.text if n else None} for o, n in events if (o, n) not in correct][:20]}


def annotated_candidates(expected: Sequence[dict], sessions: Sequence[ChatSession]) -> List[MemoryCandidate]:
    """The annotated facts as candidates, each with its session's user and the time its message
    was said: what a perfect extraction would store, to measure the update rule alone."""
    from memory.extraction import _timestamp

    by_id = {s.session_id: s for s in sessions}
    out = []
    for i, e in enumerate(expected):
        session = by_id.get(e["session_id"])
        if session is None:
            raise ValueError(f"expected fact [{i}] ({e.get('id')}): session_id {e['session_id']!r} is not a session of the set")
        out.append(MemoryCandidate(text=e["fact"], user_id=session.user_id, session_id=session.session_id,
                                   message_index=e.get("message_index"), timestamp=_timestamp(session, e.get("message_index"))))
    return out
