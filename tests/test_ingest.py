import pytest

from memory.ingest import ingest_candidates
from memory.schema import MemoryCandidate
from memory.vector_db import MemoryVectorDB
from memory.vectors import ChatModelVectorizer


@pytest.fixture
def db(tmp_path):
    d = MemoryVectorDB(tmp_path / "db")
    yield d
    d.close()


@pytest.fixture
def vectorizer(tiny_model, tokenizer):
    return ChatModelVectorizer(tiny_model, tokenizer, "tiny", template="raw")


def cand(text, ts, user="alex", sid="s1", idx=0):
    return MemoryCandidate(text=text, user_id=user, session_id=sid, message_index=idx, timestamp=ts)


NO_VECTOR_DEDUP = dict(near_duplicate_cosine=1.01)


def test_provenance_is_stored(db, vectorizer):
    rep = ingest_candidates(db, [cand("The user lives in Lisbon.", "2026-01-01T10:00:00+00:00", sid="a", idx=4)],
                            vectorizer, **NO_VECTOR_DEDUP)
    rec = db.get(rep.added[0])
    assert (rec.session_id, rec.message_index, rec.said_at, rec.status) == ("a", 4, "2026-01-01T10:00:00+00:00", "pending")
    assert rec.encoder_id == vectorizer.encoder_id and rec.subject_key == "user:live_in"


def test_exact_and_lexical_duplicates_are_skipped(db, vectorizer):
    ingest_candidates(db, [cand("The user is allergic to peanuts.", "2026-01-01")], vectorizer, **NO_VECTOR_DEDUP)
    rep = ingest_candidates(db, [cand("the user is allergic to peanuts", "2026-02-01"),
                                 cand("The user's allergic to peanuts.", "2026-02-02"),
                                 cand("The user has a peanut allergy and a cat.", "2026-02-03")],
                            vectorizer, **NO_VECTOR_DEDUP)
    assert rep.duplicate_exact == 1 and rep.duplicate_near == 1 and len(rep.added) == 1
    assert db.count(user_id="alex") == 2


def test_vector_near_duplicate(db, vectorizer):
    ingest_candidates(db, [cand("The user takes Portuguese lessons on Saturday mornings.", "2026-01-01")],
                      vectorizer, **NO_VECTOR_DEDUP)
    rep = ingest_candidates(db, [cand("The user takes Portuguese lessons every Saturday morning.", "2026-02-01")],
                            vectorizer, near_duplicate_cosine=-1.0, near_duplicate_jaccard=0.6)
    assert rep.duplicate_near == 1 and not rep.added


def test_newer_fact_supersedes_older_and_keeps_it(db, vectorizer):
    first = ingest_candidates(db, [cand("The user lives in Lisbon.", "2026-01-01")], vectorizer, **NO_VECTOR_DEDUP)
    second = ingest_candidates(db, [cand("The user moved to Porto.", "2026-05-01")], vectorizer, **NO_VECTOR_DEDUP)
    old, new = db.get(first.added[0]), db.get(second.added[0])
    assert old.status == "superseded" and old.superseded_by == new.id and old.text == "The user lives in Lisbon."
    assert new.status == "pending" and second.superseded == 1


def test_late_arriving_older_fact_is_stored_superseded(db, vectorizer):
    newer = ingest_candidates(db, [cand("The user lives in Porto.", "2026-05-01")], vectorizer, **NO_VECTOR_DEDUP)
    older = ingest_candidates(db, [cand("The user lives in Lisbon.", "2026-01-01")], vectorizer, **NO_VECTOR_DEDUP)
    assert db.get(newer.added[0]).status == "pending"
    assert db.get(older.added[0]).status == "superseded"


def test_other_owners_and_users_do_not_supersede(db, vectorizer):
    ingest_candidates(db, [cand("The user lives in Lisbon.", "2026-01-01"),
                           cand("The user's sister lives in Madrid.", "2026-02-01"),
                           cand("The user lives in Berlin.", "2026-03-01", user="sam")],
                      vectorizer, **NO_VECTOR_DEDUP)
    assert db.count(statuses=("pending",)) == 3


def test_within_one_batch_order_is_by_time(db, vectorizer):
    rep = ingest_candidates(db, [cand("The user is 30 years old.", "2026-04-18"),
                                 cand("The user is 29 years old.", "2026-01-10")], vectorizer, **NO_VECTOR_DEDUP)
    live = db.records(statuses=("pending",))
    assert [r.text for r in live] == ["The user is 30 years old."] and rep.superseded == 1


def test_facts_of_one_message_do_not_supersede_each_other(db, vectorizer):
    said = "2026-05-09T10:00:00+00:00"
    rep = ingest_candidates(db, [cand("The user drives an old Fiat Panda.", "2026-01-10", sid="a", idx=2),
                                 cand("The user sold the Fiat before the move.", said, sid="b", idx=4),
                                 cand("The user stopped driving the Fiat.", said, sid="b", idx=4)],
                            vectorizer, **NO_VECTOR_DEDUP)
    status = {db.get(i).text: db.get(i).status for i in rep.added}
    assert status == {"The user drives an old Fiat Panda.": "superseded",
                      "The user sold the Fiat before the move.": "pending",
                      "The user stopped driving the Fiat.": "pending"}


def test_a_correction_in_the_same_message_supersedes(db, vectorizer):
    said = "2026-05-09T10:00:00+00:00"
    rep = ingest_candidates(db, [cand("The user's bus pass costs 48 a month.", said, sid="b", idx=4),
                                 cand("The user's bus pass costs 52 a month, not 48.", said, sid="b", idx=4)],
                            vectorizer, **NO_VECTOR_DEDUP)
    status = {db.get(i).text: db.get(i).status for i in rep.added}
    assert status == {"The user's bus pass costs 48 a month.": "superseded",
                      "The user's bus pass costs 52 a month, not 48.": "pending"}


def test_the_update_rule_alone_on_annotated_facts(db, vectorizer):
    from memory.extraction_eval import annotated_candidates, score_updates
    from memory.schema import ChatMessage, ChatSession

    def session(sid, day, text):
        return ChatSession(sid, "ines", f"2026-0{day}-01T09:00:00+00:00",
                           [ChatMessage("user", text), ChatMessage("assistant", "Noted.")])

    sessions = [session("s1", 1, "I live in Braga."), session("s2", 3, "I moved to Faro!"), session("s3", 2, "I like figs.")]
    expected = [{"id": "a", "session_id": "s1", "message_index": 0, "fact": "The user lives in Braga.", "keywords": ["braga"]},
                {"id": "b", "session_id": "s2", "message_index": 0, "fact": "The user moved to Faro.", "keywords": ["faro"],
                 "supersedes": "a"},
                {"id": "c", "session_id": "s3", "message_index": 0, "fact": "The user likes figs.", "keywords": ["figs"]}]
    cands = annotated_candidates(expected, sessions)
    assert [(c.user_id, c.timestamp[:7]) for c in cands] == [("ines", "2026-01"), ("ines", "2026-03"), ("ines", "2026-02")]
    ingest_candidates(db, cands, vectorizer, **NO_VECTOR_DEDUP)
    scores = score_updates(db.records(), expected)
    assert (scores["precision"], scores["recall"]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="session_id 'nope'"):
        annotated_candidates([{**expected[0], "session_id": "nope"}], sessions)


@pytest.mark.reliability(fault="A forgotten fact proposed again by a later extraction, reworded in case and order",
                         outcome="not stored; only the user's own add lifts the tombstone")
def test_a_forgotten_fact_does_not_come_back_unless_added_by_hand(db, vectorizer):
    rep = ingest_candidates(db, [cand("The user's wifi password is Tulip42.", "2026-01-10", sid="s", idx=1),
                                 cand("The user lives in Lyon.", "2026-01-10", sid="s", idx=2)], vectorizer)
    db.forget([rep.added[0]])
    # the session grew a message: re-extraction proposes the same fact, and the same words reordered
    again = ingest_candidates(db, [cand("The user's wifi password is Tulip42.", "2026-02-01", sid="s", idx=1),
                                   cand("the user's WIFI password is tulip42", "2026-02-01", sid="s", idx=1)], vectorizer)
    assert again.added == [] and again.forgotten == 2
    assert [r.text for r in db.records(statuses=("pending", "active"))] == ["The user lives in Lyon."]
    assert not any("Tulip42" in str(row) for row in db._connection().execute("SELECT * FROM forgotten"))
    manual = MemoryCandidate(text="The user's wifi password is Tulip42.", user_id="alex", source="manual")
    assert ingest_candidates(db, [manual], vectorizer).added  # the user adds it again: allowed
    other_user = cand("The user's wifi password is Tulip42.", "2026-02-01", user="sam")
    assert ingest_candidates(db, [other_user], vectorizer).added  # a tombstone is per user


@pytest.mark.reliability(fault="forget while a batch of memories is being stored", outcome="the run skips the forgotten record and goes on")
def test_a_memory_forgotten_during_ingest_is_not_superseded(db, vectorizer):
    [old] = ingest_candidates(db, [cand("The user lives in Lyon.", "2026-01-10", sid="a")], vectorizer).added
    from memory.ingest import _UserView

    view = _UserView(db, "alex")  # the batch's view, read before the forget
    db.forget([old])
    from memory.ingest import _add_with_update_rule, IngestReport

    rep = IngestReport()
    new = cand("The user moved to Nice.", "2026-03-01", sid="b")
    _add_with_update_rule(db, view, new, vectorizer.encode([new.text])[0], vectorizer.encoder_id, rep)
    assert rep.superseded == 0 and db.get(old).status == "deleted" and len(rep.added) == 1
