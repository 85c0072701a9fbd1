"""The annotated data sets under examples/ are well formed: every expected fact points at a user
message of a session that exists, every update at an earlier fact of the same user, and every
noise item at a user message (bench.extraction_quality reads them all)."""
import json
from pathlib import Path

import pytest

from bench.extraction_quality import SETS
from memory.chat_store import ChatStore
from memory.extraction_eval import load_expected, load_noise


@pytest.mark.parametrize("name", sorted(SETS))
def test_annotations_point_at_user_messages_of_existing_sessions(name):
    folder = Path(SETS[name])
    sessions = {s.session_id: s for s in ChatStore(folder / "chats").load_sessions(strict=True).sessions}
    expected = load_expected(folder / "expected_facts.json")
    by_id = {e["id"]: e for e in expected}
    assert len(by_id) == len(expected), f"{name}: duplicate ids"
    for e in expected:
        session = sessions[e["session_id"]]
        assert session.user_id == e.get("user_id", session.user_id), e["id"]
        assert session.messages[e["message_index"]].role == "user", e["id"]
        assert e["keywords"] and all(k.strip() for k in e["keywords"]), e["id"]
        if e.get("supersedes"):
            old = by_id[e["supersedes"]]
            assert sessions[old["session_id"]].user_id == session.user_id, e["id"]
            assert sessions[old["session_id"]].created_at <= session.created_at, e["id"]
    for n in load_noise(folder / "noise.json"):
        assert sessions[n["session_id"]].messages[n["message_index"]].role == "user", n


def test_the_third_development_set_quotes_its_keywords():
    """dev3's keywords are all in the message they annotate, so a miss is the extractor's."""
    folder = Path(SETS["dev3"])
    sessions = {json.loads(p.read_text(encoding="utf-8"))["session_id"]: json.loads(p.read_text(encoding="utf-8"))
                for p in (folder / "chats").glob("*.json")}
    for e in load_expected(folder / "expected_facts.json"):
        text = sessions[e["session_id"]]["messages"][e["message_index"]]["content"].lower()
        assert all(k.lower() in text for k in e["keywords"]), e["id"]
