"""Score extracted facts against annotated expected facts (``examples/expected_facts.json``).

Matching rule: an extracted fact matches an expected fact when both come from the same
session and the extracted text contains every keyword of the expected fact
(case-insensitive substring). Recall = expected facts matched; precision = extracted
facts that match some expected fact.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

from memory.schema import MemoryCandidate


def load_expected(path) -> List[dict]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for i, item in enumerate(data):
        for key in ("session_id", "keywords", "fact"):
            if key not in item:
                raise ValueError(f"{path}: [{i}].{key}: missing")
    return data


def _matches(text: str, expected: dict) -> bool:
    low = text.lower()
    return all(k.lower() in low for k in expected["keywords"])


def score_extraction(facts: Sequence[MemoryCandidate], expected: Sequence[dict]) -> Dict[str, float]:
    by_session: Dict[str, List[dict]] = {}
    for e in expected:
        by_session.setdefault(e["session_id"], []).append(e)
    found = sum(any(_matches(f.text, e) for f in facts if f.session_id == e["session_id"])
                for e in expected)
    correct = sum(any(_matches(f.text, e) for e in by_session.get(f.session_id, [])) for f in facts)
    return {
        "recall": found / len(expected) if expected else 0.0,
        "precision": correct / len(facts) if facts else 0.0,
        "n_facts": len(facts),
        "n_expected": len(expected),
    }
