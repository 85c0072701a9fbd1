"""memory.search: the recall loop's search callbacks (fused ranking with the real MiniLM)."""
import numpy as np
import pytest

from memory.schema import MemoryCandidate
from memory.search import FusedSearch, _standardised, db_search, make_search
from memory.vector_db import MemoryVectorDB
from memory.vectors import SentenceEncoderVectorizer
from recall.generation import passes

TEXTS = ["The user lives in Porto.", "The user has a dog called Max.", "The user works as a nurse.",
         "The user's sister lives in Madrid."]


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoderVectorizer("minilm")


@pytest.fixture
def db(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(len(TEXTS), 16)).astype(np.float32)
    with MemoryVectorDB(tmp_path / "db") as d:
        d.add([MemoryCandidate(text=t, user_id="alex") for t in TEXTS], vectors, "enc", status="active")
        d.add([MemoryCandidate(text="Bo has a cat.", user_id="bo")], vectors[:1], "enc", status="active")
        yield d, vectors


def test_fused_order_is_the_sum_of_both_standardised_cosines(db, minilm):
    d, vectors = db
    search = FusedSearch(d, "alex", minilm, top_k=4)
    query = (vectors[2] + 0.1 * vectors[0])[None]  # <recall> says "nurse"
    texts = ["Which city do I live in?"]  # the turn says "Porto"
    s = search.scores(query, texts)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.allclose(s["recall"], query @ unit.T, atol=1e-5)
    assert np.allclose(s["fused"], _standardised(s["recall"]) + _standardised(s["encoder"]))
    [hits] = search(query, texts)
    assert [h.text for h in hits] == [TEXTS[i] for i in np.argsort(-s["fused"][0], kind="stable")]
    assert all(h.text != "Bo has a cat." for h in hits)  # only this user's memories
    # each hit keeps its own <recall> cosine, so the threshold reads <recall> whatever the order
    by_text = {h.text: h.score for h in hits}
    assert by_text[TEXTS[2]] == pytest.approx(float(s["recall"][0, 2]), abs=1e-5)


def test_the_memory_that_decides_whether_to_recall_is_always_returned(db, minilm):
    d, vectors = db
    query = vectors[1][None]  # <recall>'s best is the dog
    [hits] = FusedSearch(d, "alex", minilm, top_k=1)(query, ["Where does my sister live?"])
    assert hits[0].text == "The user's sister lives in Madrid."  # the fused order's first (MiniLM wins here)
    assert hits[-1].text == "The user has a dog called Max."  # appended: its cosine decides passes()
    assert passes(hits, 0.99) and not passes(hits[:1], 0.99)


def test_without_texts_and_for_an_empty_bank_it_is_the_plain_search(db, minilm):
    d, vectors = db
    q = vectors[:1]
    plain = db_search(d, "alex", 2)(q)
    fused = FusedSearch(d, "alex", minilm, top_k=2)(q)
    assert [[h.memory_id for h in r] for r in fused] == [[h.memory_id for h in r] for r in plain]
    assert FusedSearch(d, "carol", minilm)(q, ["hi"]) == [[]]
    assert make_search(d, "alex", 2, "recall").__name__ == "search"
    with pytest.raises(ValueError, match="retrieval"):
        make_search(d, "alex", 2, "bm25")
